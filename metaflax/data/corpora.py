"""The built-in corpora as plain Python: texts, labels and class splits, ready to tokenize.

Each function reads one dataset (through its TFDS builder, :mod:`metaflax.data.builders`, or
from ``babel``'s CLDR data) and returns lists of strings with explicit arguments, so a notebook
can call it. ``data_dir`` is a local copy of the source files laid out like ``shared/data`` (one
folder per dataset); ``None`` reads ``METAFLAX_DATA_DIR``, else downloads the checksummed
upstream files.

>>> split = cldr_language_id(num_test=25, num_val=10)
>>> len(set(split.test_labels)), len(set(split.val_labels))
(25, 10)
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from metaflax.data import cldr
from metaflax.data.families import QAExample
from metaflax.data.text_sources import as_text, classes_by_group, clean_labeled


class ClassSplit(NamedTuple):
    """Labeled texts split into meta-train, meta-validation and meta-test classes (disjoint)."""

    train_texts: list[str]
    train_labels: list[str]
    val_texts: list[str]
    val_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]


def data_dir(path: str | None = None) -> str | None:
    """The source directory: ``path``, else ``METAFLAX_DATA_DIR``, else None (download)."""
    return path or os.environ.get("METAFLAX_DATA_DIR") or None


def split_by_class(texts, labels, val_classes, test_classes) -> ClassSplit:
    """Every example goes to the split of its class; classes in neither set are meta-train.

    >>> split_by_class(["a", "b", "c"], ["x", "y", "z"], {"y"}, {"z"}).test_texts
    ['c']
    """
    out = [[], [], [], [], [], []]
    for text, label in zip(texts, labels, strict=True):
        k = 4 if label in test_classes else 2 if label in val_classes else 0
        out[k].append(text)
        out[k + 1].append(label)
    return ClassSplit(*out)


def random_class_split(
    classes, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[str]]:
    """``{"train", "val", "test"}``: the distinct ``classes`` shuffled with ``seed`` and cut by
    ``fractions`` (meta-train, meta-validation, meta-test; rounded, each non-zero fraction
    gets at least one class). The same classes and seed give the same split.

    >>> random_class_split(["a", "b", "c", "d", "e"], (0.6, 0.2, 0.2), seed=0)
    {'train': ['a', 'b', 'd'], 'val': ['e'], 'test': ['c']}
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"class split fractions {fractions} must be three non-negative numbers (meta-train, "
            "meta-validation, meta-test) that sum to 1, e.g. (0.6, 0.2, 0.2)."
        )
    names = sorted(set(classes))
    order = np.random.default_rng(seed).permutation(len(names))
    n_val, n_test = (max(round(f * len(names)), 1 if f > 0 else 0) for f in fractions[1:])
    if n_val + n_test >= len(names) and fractions[0] > 0:
        raise ValueError(
            f"{len(names)} classes are too few to split by {fractions}: give the file more "
            "classes or use a class split file."
        )
    cut = [names[i] for i in order]
    parts = {"test": cut[:n_test], "val": cut[n_test : n_test + n_val]}
    parts["train"] = cut[n_test + n_val :]
    return {k: sorted(parts[k]) for k in ("train", "val", "test")}


def read_class_split(path: str, classes) -> dict[str, list[str]]:
    """A class split from a JSON file ``{"train": [...], "val": [...], "test": [...]}`` (``val``
    may be absent; classes of ``classes`` it does not name are left out), checked against
    ``classes``: every class named once, and only classes that exist."""
    try:
        with open(path) as f:
            split = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"class split file {path}: {e}") from None
    if not isinstance(split, dict) or set(split) - {"train", "val", "test"}:
        raise ValueError(
            f"class split file {path} must hold an object with the keys 'train', 'val' (optional) "
            "and 'test', each a list of class names."
        )
    split = {k: [str(c) for c in split.get(k, [])] for k in ("train", "val", "test")}
    named = [c for part in split.values() for c in part]
    repeated = sorted({c for c in named if named.count(c) > 1})
    unknown = sorted(set(named) - {str(c) for c in classes})
    if repeated or unknown:
        raise ValueError(
            f"class split file {path}: classes named more than once {repeated[:5]}, classes "
            f"not in the data {unknown[:5]}; each class belongs to one split."
        )
    return split


def _records(name: str, split: str, path: str | None) -> list[dict]:
    from metaflax.data import builders  # imports tensorflow_datasets: only when needed

    return builders.records(name, split, source_dir=data_dir(path))


def cldr_language_id(
    *, min_terms: int = 800, num_test: int = 25, num_val: int = 10, seed: int = 0
) -> ClassSplit:
    """Language identification on CLDR terms: a class is a language (of those with at least
    ``min_terms`` terms), split by ``seed``; the test languages do not depend on ``num_val``."""
    splits = cldr.language_split(sorted(cldr.cldr_terms(min_terms)), num_test, num_val, seed=seed)
    out = []
    for languages in splits:
        texts, labels, names = cldr.language_id_examples(languages)
        out += [texts, [names[i] for i in labels]]
    return ClassSplit(*out)


def clinc150(*, test_domains, val_domains=(), path: str | None = None) -> ClassSplit:
    """CLINC150's in-scope utterances (train, val and test splits pooled), intents split by
    domain: the intents of ``test_domains`` are meta-test, of ``val_domains`` meta-validation,
    of the other domains meta-train."""
    records = [r for s in ("train", "val", "test") for r in _records("clinc150", s, path)]
    labels = [as_text(r["intent"]) for r in records]
    groups = classes_by_group(labels, [as_text(r["domain"]) for r in records])
    texts, labels, _ = clean_labeled([as_text(r["text"]) for r in records], labels, "clinc150")
    unknown = sorted((set(test_domains) | set(val_domains)) - set(groups))
    if unknown:
        raise ValueError(f"unknown CLINC150 domains {unknown}; valid: {sorted(groups)}.")
    test = {c for d in test_domains for c in groups[d]}
    val = {c for d in val_domains for c in groups[d]}
    return split_by_class(texts, labels, val, test)


def huffpost(*, path: str | None = None) -> ClassSplit:
    """HuffPost headlines with the standard class split of Bao et al. 2020
    (:data:`HUFFPOST_CLASS_SPLIT`); labels are the category ids as strings."""
    from metaflax.data.builders import HUFFPOST_CLASS_SPLIT

    records = _records("huffpost", "train", path)
    texts = [as_text(r["text"]) for r in records]
    texts, labels, _ = clean_labeled(texts, [as_text(r["label"]) for r in records], "huffpost")
    val = {str(c) for c in HUFFPOST_CLASS_SPLIT["val"]}
    test = {str(c) for c in HUFFPOST_CLASS_SPLIT["test"]}
    return split_by_class(texts, labels, val, test)


def mark_entities(record) -> str:
    """A FewRel sentence with its head and tail entities marked (``[E1] .. [/E1]``).

    >>> mark_entities({"tokens": ["Ada", "met", "Bob"], "head": [0, 0], "tail": [2, 2]})
    '[E1] Ada [/E1] met [E2] Bob [/E2]'
    """
    tokens = [as_text(t) for t in record["tokens"]]
    (h0, h1), (t0, t1) = (int(i) for i in record["head"]), (int(i) for i in record["tail"])
    out = []
    for i, tok in enumerate(tokens):
        out += ["[E1]"] * (i == h0) + ["[E2]"] * (i == t0) + [tok]
        out += ["[/E1]"] * (i == h1) + ["[/E2]"] * (i == t1)
    return " ".join(out)


def fewrel(*, train_domain: str = "wiki", test_domain: str = "nyt", path=None) -> ClassSplit:
    """FewRel relations across domains: the relations of ``train_domain`` are meta-train, those
    of ``test_domain`` meta-test (no validation classes); labels are ``domain/relation`` and
    sentences have their entities marked (:func:`mark_entities`)."""
    texts, labels = [], []
    for domain in (train_domain, test_domain):
        for r in _records("fewrel", domain, path):
            texts.append(mark_entities(r))
            labels.append(f"{domain}/{as_text(r['relation'])}")
    texts, labels, _ = clean_labeled(texts, labels, "fewrel")
    test = {c for c in labels if c.startswith(test_domain + "/")}
    return split_by_class(texts, labels, set(), test)


def tfds_labeled(
    name: str,
    *,
    split: str = "train",
    text_features=("text",),
    label_feature: str = "label",
    separator: str = " ",
):
    """The labeled texts of a TFDS catalog dataset prepared as ``array_record`` (read with
    ``tfds.data_source`` from the cache directory), cleaned like a user's file
    (:func:`metaflax.data.text_sources.clean_labeled`); class ids become their names."""
    from metaflax.data import builders

    features = builders.data_source(name, split).dataset_info.features
    records = builders.records(name, split)
    missing = [f for f in (*text_features, label_feature) if f not in features]
    if missing:
        raise ValueError(
            f"tfds:{name} has no feature(s) {missing}; its features are {sorted(features)}. "
            "Name them with --config.data.text_columns / --config.data.label_column."
        )
    to_name = getattr(features[label_feature], "int2str", None)
    texts = [separator.join(as_text(r[f]).strip() for f in text_features) for r in records]
    labels = [
        to_name(int(r[label_feature])) if to_name else as_text(r[label_feature]) for r in records
    ]
    return clean_labeled(texts, labels, f"tfds:{name}/{split}")


def unlabeled_text(name: str, *, max_sentences: int | None = None, path=None) -> list[str]:
    """Non-empty lines of unlabeled English: ``"wiki"`` (CLINC's Wikipedia sentences) or
    ``"shakespeare"`` (Tiny Shakespeare), the first ``max_sentences``."""
    return [as_text(r["text"]) for r in _records("unlabeled_text", name, path)][:max_sentences]


def tatoeba_pairs(*, path: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """``{language: [(sentence, its English translation)]}`` of Tatoeba (ISO 639-3 codes)."""
    pairs: dict[str, list] = {}
    for r in _records("tatoeba", "train", path):
        pairs.setdefault(as_text(r["language"]), []).append(
            (as_text(r["source"]), as_text(r["english"]))
        )
    return pairs


def cldr_term_pairs(*, min_terms: int = 800) -> dict[str, list[tuple[str, str]]]:
    """``{language: [(term, its English term)]}`` for the CLDR languages other than English."""
    languages = [lang for lang in sorted(cldr.cldr_terms(min_terms)) if lang != "en"]
    return {lang: [(b, a) for a, b in cldr.translation_pairs(lang)] for lang in languages}


def xquad_examples(*, path: str | None = None) -> dict[str, list[QAExample]]:
    """``{language: [QAExample]}`` of XQuAD; a task is an article in one language
    (``QAExample.task = "<language>/<title>"``)."""
    by_language: dict[str, list] = {}
    for r in _records("xquad", "test", path):
        lang = as_text(r["language"])
        by_language.setdefault(lang, []).append(
            QAExample(
                f"{lang}/{as_text(r['title'])}",
                as_text(r["question"]),
                as_text(r["context"]),
                as_text(r["answer_text"]),
                int(r["answer_start"]),
            )
        )
    return by_language
