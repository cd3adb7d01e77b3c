"""Labeled text from TFDS data sources or users' own files, tokenized once with HF tokenizers."""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from metaflax.data.sampler import LabeledTokens


def as_text(value) -> str:
    """A record field as ``str``: TFDS gives real text as ``bytes`` (mocked text as ``str``).

    >>> as_text(b"caf\\xc3\\xa9"), as_text(3)
    ('café', '3')
    """
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


class LabeledTexts(NamedTuple):
    """Texts and their string labels as read from a file, with what reading dropped.

    ``stats``: ``rows`` read, ``empty`` (empty or whitespace-only texts, dropped),
    ``duplicates`` (repeated (text, label) rows, dropped), ``conflicts`` (distinct texts found
    under more than one label, kept under each) and ``conflict_examples`` (up to 5 of them).
    """

    texts: list[str]
    labels: list[str]
    stats: dict


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line}: bytes that are not UTF-8 ({data[e.start : e.start + 4]!r}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
        ) from None


def _rows(path: str) -> list[tuple[int, dict]]:
    """``(line or row number, record)`` of a CSV / TSV / JSONL (or JSON array) / Parquet file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise ValueError(f"{path}: unsupported extension {ext!r}; use {', '.join(FILE_FORMATS)}.")
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid & co. for damaged files
            raise ValueError(f"{path} is not a readable Parquet file: {e}") from None
        return list(enumerate(table.to_pylist(), start=1))
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    if ext in (".csv", ".tsv"):
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t" if ext == ".tsv" else ","
        )
        return [(reader.line_num, row) for row in reader]
    if text.lstrip().startswith("["):  # a JSON array of objects
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}: invalid JSON ({e.msg}).") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: invalid JSON ({e.msg}).") from None
    return rows


def read_labeled_file(
    path: str,
    *,
    text_columns: Sequence[str] | str = "text",
    label_column: str = "label",
    separator: str = " ",
    labeled: bool = True,
) -> LabeledTexts:
    """The labeled texts of a CSV, TSV, JSONL (or JSON array) or Parquet file.

    Several ``text_columns`` are joined with ``separator`` (e.g. ``" [SEP] "`` for a BERT
    tokenizer). Empty or whitespace-only texts and repeated (text, label) rows are dropped and
    counted in ``stats``; texts under several labels are counted and reported with a warning.
    ``labeled=False`` reads texts only (labels are then ``""`` where the column is absent or
    empty). Missing columns, a row without a label, bytes that are not UTF-8 and invalid JSON
    are one ``ValueError`` naming the file, the line and the fix.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "d.csv")
    >>> _ = open(path, "w").write("text,label\\npay my bill,pay\\npay my bill,pay\\n ,pay\\n")
    >>> data = read_labeled_file(path)
    >>> data.texts, data.labels, data.stats["duplicates"], data.stats["empty"]
    (['pay my bill'], ['pay'], 1, 1)
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    rows = _rows(path)
    if not rows and labeled:
        raise ValueError(f"{path} has no rows.")
    found = sorted({k for _, r in rows for k in (r if isinstance(r, dict) else {})})
    missing = [c for c in [*columns, *([label_column] if labeled else [])] if c not in found]
    if rows and missing:
        raise ValueError(
            f"{path} has no column(s) {missing}; its columns are {found}. Name the text and "
            "label columns (text_columns= / label_column=, in the trainer "
            "--config.data.text_columns / --config.data.label_column)."
        )
    texts, labels = [], []
    for line, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {line}: expected an object with named columns.")
        absent = [c for c in columns if c not in row]
        if absent:
            raise ValueError(f"{path}, line {line}: no column(s) {absent} in this row.")
        label = row.get(label_column)
        if labeled and (label is None or not str(label).strip()):
            raise ValueError(
                f"{path}, line {line}: no label in column {label_column!r}; label the row or "
                "remove it."
            )
        texts.append(separator.join(str(row[c]).strip() for c in columns if row[c] is not None))
        labels.append("" if label is None else str(label).strip())
    return clean_labeled(texts, labels, path)


def clean_labeled(texts: Sequence[str], labels: Sequence[str], source: str = "") -> LabeledTexts:
    """Drops empty or whitespace-only texts and repeated (text, label) pairs (the first is
    kept, order preserved), counts texts under several labels (kept under each, with a
    warning); what was dropped is in ``stats`` (see :class:`LabeledTexts`) and a warning.

    >>> clean_labeled(["a", "a", " ", "b", "b"], ["x", "x", "x", "x", "y"]).stats["conflicts"]
    1
    """
    out_texts, out_labels, seen, label_of, conflicts = [], [], set(), {}, []
    stats = {"rows": len(texts), "empty": 0, "duplicates": 0}
    for text, label in zip(texts, labels, strict=True):
        if not text.strip():
            stats["empty"] += 1
            continue
        if (text, label) in seen:
            stats["duplicates"] += 1
            continue
        seen.add((text, label))
        if label_of.setdefault(text, label) != label and text not in conflicts:
            conflicts.append(text)
        out_texts.append(text)
        out_labels.append(label)
    stats["conflicts"] = len(conflicts)
    stats["conflict_examples"] = conflicts[:5]
    where = f"{source}: " if source else ""
    if conflicts:
        warnings.warn(
            f"{where}{len(conflicts)} texts appear under more than one label (kept under each), "
            f"e.g. {conflicts[:3]}.",
            stacklevel=2,
        )
    if stats["empty"] or stats["duplicates"]:
        warnings.warn(
            f"{where}dropped {stats['empty']} empty texts and {stats['duplicates']} duplicate "
            "(text, label) rows.",
            stacklevel=2,
        )
    return LabeledTexts(out_texts, out_labels, stats)


def records_to_texts(records: Iterable[dict], text_key: str, label_key: str):
    """Texts and string labels from TFDS records (``bytes`` or ``str`` fields, or class ids)."""
    texts, labels = [], []
    for record in records:
        texts.append(as_text(record[text_key]))
        labels.append(as_text(record[label_key]))
    return texts, labels


def classes_by_group(labels: Sequence[str], groups: Sequence[str]) -> dict[str, list[str]]:
    """``{group: sorted classes}``, e.g. CLINC150 intents by domain for a split by domain.

    >>> classes_by_group(["pay", "balance", "alarm"], ["banking", "banking", "utility"])
    {'banking': ['balance', 'pay'], 'utility': ['alarm']}
    """
    out: dict[str, set[str]] = {}
    for label, group in zip(labels, groups, strict=True):
        out.setdefault(group, set()).add(label)
    clash = {
        c for g, cs in out.items() for c in cs if any(c in o for h, o in out.items() if h != g)
    }
    if clash:
        raise ValueError(f"classes in more than one group: {sorted(clash)[:5]}")
    return {g: sorted(cs) for g, cs in sorted(out.items())}


def load_tokenizer(path: str):
    """A local HF tokenizer directory (``AutoTokenizer``), with one clear error if it is not."""
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} is not a tokenizer directory (save one with save_pretrained)."
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} holds no loadable HF tokenizer: {e}") from None


def tokenize_labeled(
    texts: Sequence[str], labels: Sequence[str], tokenizer, max_len: int
) -> LabeledTokens:
    """Tokenizes every example once (HF tokenizer, padded/truncated to ``max_len``)."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels.")
    enc = tokenizer(
        list(texts), max_length=max_len, truncation=True, padding="max_length", return_tensors="np"
    )
    class_names = tuple(sorted(set(labels)))
    index = {c: i for i, c in enumerate(class_names)}
    return LabeledTokens(
        enc["input_ids"].astype(np.int32),
        enc["attention_mask"].astype(bool),
        np.array([index[label] for label in labels], np.int32),
        class_names,
    )


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, save_dir: str | None = None):
    """Trains a lower-cased BERT-style WordPiece vocabulary with ``tokenizers``.

    Returns a ``transformers.PreTrainedTokenizerFast`` (saved to ``save_dir`` if given, and
    reloadable there with ``AutoTokenizer.from_pretrained``).
    """
    import tokenizers
    import transformers
    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    def bert_style(model):
        tok = tokenizers.Tokenizer(model)
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return tok

    texts = list(texts)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer_tok = bert_style(tokenizers.models.WordPiece(unk_token="[UNK]"))
    # tokenizers' trainer gives the "##x" continuation pieces ids in hash-map order, and those
    # ids break ties between equally frequent merges: the same texts gave vocabularies of
    # 7517-7521 pieces from run to run (huggingface/tokenizers#1794). Naming every continuation
    # piece up front, sorted, fixes their ids, and so the whole vocabulary.
    normalize, split = trainer_tok.normalizer.normalize_str, trainer_tok.pre_tokenizer
    inner = set()
    for text in texts:
        for word, _ in split.pre_tokenize_str(normalize(text)):
            inner.update(word[1:])
    continuation = ["##" + c for c in sorted(inner)]
    trainer = tokenizers.trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials + continuation
    )
    trainer_tok.train_from_iterator(texts, trainer)
    # The trained vocabulary in a fresh tokenizer, where only the five real specials are special.
    vocab = trainer_tok.get_vocab(with_added_tokens=False)
    tok = bert_style(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.WordPiece(prefix="##")  # decode joins "un ##fa ##th" into "unfath"
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast
