"""Labeled text from TFDS data sources or users' own files, tokenized once with HF tokenizers."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from metaflax.data.sampler import LabeledTokens


def as_text(value) -> str:
    """A record field as ``str``: TFDS gives real text as ``bytes`` (mocked text as ``str``).

    >>> as_text(b"caf\\xc3\\xa9"), as_text(3)
    ('café', '3')
    """
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_labeled_file(
    path: str, *, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` from a CSV, TSV or JSONL file with a text and a label column."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".csv", ".tsv"):
            rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
        elif ext in (".jsonl", ".json"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            raise ValueError(f"{path}: unsupported extension {ext!r}; use .csv, .tsv or .jsonl.")
    if not rows:
        raise ValueError(f"{path} has no rows.")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise ValueError(
            f"{path} has no column(s) {missing}; its columns are {sorted(rows[0])}. Pass "
            "text_column= and label_column=."
        )
    return [str(r[text_column]) for r in rows], [str(r[label_column]) for r in rows]


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
