"""Task families for :mod:`experiments.fewshot`: data, model, loss and evaluation of each.

A :class:`Family` is everything the trainer needs to meta-train, pretrain and evaluate on one
kind of task, with meta-train and meta-test tasks disjoint by class or language; one module per
kind: :mod:`~experiments.families.classification`, :mod:`~experiments.families.qa`,
:mod:`~experiments.families.translation`. ``mixed`` runs several of them on one shared encoder.
"""

from __future__ import annotations

import os

from experiments.configs.common import with_fields
from experiments.families import classification, qa, sources, translation
from experiments.families.common import (
    ClassBaselines,
    Family,
    Pooled,
    Shared,
    fine_tune_adapt,
    make_encoder,
)
from experiments.families.sources import is_classification, is_user_source, source_name
from metaflax.data import text_sources

CLASSIFICATION = sources.DATASETS
TRANSLATION = translation.DATASETS
QA = qa.DATASETS
DATASETS = CLASSIFICATION + TRANSLATION + QA
POOLS = ("cls", "mean", "mean+bow")

__all__ = [
    "CLASSIFICATION",
    "DATASETS",
    "QA",
    "TRANSLATION",
    "ClassBaselines",
    "Family",
    "Pooled",
    "Shared",
    "check_config",
    "fine_tune_adapt",
    "is_classification",
    "make_family",
    "mixed_families",
    "source_name",
]


def check_config(config) -> None:
    """Fails early, naming the fix, on dataset, tokenizer and model settings that cannot work
    (before any data is read)."""
    if config.dataset not in (*DATASETS, "mixed") and not is_classification(config.dataset):
        valid = ", ".join((*DATASETS, "mixed"))
        raise ValueError(
            f"unknown dataset {config.dataset!r}; valid: {valid}, a labeled file "
            f"({' '.join(text_sources.FILE_FORMATS)}), tfds:NAME (a TFDS catalog dataset), or "
            "classification sources joined with '+'."
        )
    if config.test_dataset and not (
        is_classification(config.dataset) and is_classification(config.test_dataset)
    ):
        raise ValueError(
            f"test_dataset={config.test_dataset!r} meta-tests a classification dataset on "
            "another's classes: both dataset and test_dataset must be classification sources."
        )
    for name in [*config.dataset.split("+"), *config.test_dataset.split("+")]:
        if is_user_source(name) and not name.startswith("tfds:") and not os.path.isfile(name):
            raise FileNotFoundError(
                f"{name} does not exist: pass the path of a labeled file (--config.dataset)."
            )
    if config.model.pool not in POOLS:
        valid = ", ".join(map(repr, POOLS))
        raise ValueError(f"model.pool={config.model.pool!r}; valid: {valid}.")
    if config.model.pool == "mean+bow" and not is_classification(config.dataset):
        raise ValueError(
            "model.pool='mean+bow' needs a single classification dataset (its IDF comes from "
            "the meta-training text); use pool='mean' for QA, translation and mixed runs."
        )
    if config.model.train_layers >= 0 and not (
        config.model.hf_path
        and is_classification(config.dataset)
        and config.meta_train_on == "classes"
        and config.model.pool in ("mean", "cls")
    ):
        raise ValueError(
            f"model.train_layers={config.model.train_layers} trains the top blocks of a "
            "pretrained encoder on its frozen trunk's outputs: it needs --config.model.hf_path, "
            "a classification dataset meta-trained on its classes and model.pool 'mean' or "
            "'cls'; set model.train_layers=-1 to train the whole encoder."
        )
    if config.meta_train_on not in ("classes", "smlmt"):
        raise ValueError(f"meta_train_on={config.meta_train_on!r}; valid: 'classes', 'smlmt'.")
    if config.tokenizer not in ("char", "wordpiece", "hf"):
        raise ValueError(f"tokenizer={config.tokenizer!r}; valid: 'char', 'wordpiece', 'hf'.")
    if config.tokenizer == "hf" and not config.model.hf_path:
        raise ValueError(
            "tokenizer='hf' uses the tokenizer of an HF model directory: pass "
            "--config.model.hf_path=/path/to/bert (config.json, model.safetensors, vocab)."
        )
    if config.tokenizer == "char" and config.meta_train_on == "smlmt":
        raise ValueError("SMLMT masks words: use tokenizer='wordpiece' or 'hf', not 'char'.")
    if config.tokenizer == "char" and config.dataset in QA:
        raise ValueError(f"tokenizer={config.tokenizer!r}; QA needs 'wordpiece' or 'hf'.")


def make_family(config, tokenizer=None, shared: Shared | None = None) -> Family:
    """The :class:`Family` of ``config.dataset``."""
    if is_classification(config.dataset):
        return classification.classification_family(config, tokenizer, shared)
    if config.dataset in TRANSLATION:
        return translation.translation_family(config, shared)
    if config.dataset in QA:
        return qa.qa_family(config, tokenizer, shared)
    raise ValueError(f"unknown dataset {config.dataset!r}; valid: {', '.join(DATASETS)}.")


def mixed_families(config) -> dict[str, Family]:
    """``config.mixed.datasets`` meta-trained together: one word-piece tokenizer trained on all
    their meta-training text and one BERT encoder shared by the classification head, the span
    head and the translation decoder. Per-dataset settings in ``config.mixed.overrides``."""
    subs = {
        name: with_fields(config, dataset=name, **config.mixed.overrides.to_dict().get(name, {}))
        for name in config.mixed.datasets
    }
    unknown = sorted(set(subs) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown mixed datasets {unknown}; valid: {', '.join(DATASETS)}.")
    texts = []
    for name, sub in subs.items():
        if name in CLASSIFICATION:
            texts += sources.labeled_texts(sub).train_texts
        elif name in QA:
            texts += [t for e in qa.qa_examples(sub)[0] for t in (e.question, e.context)]
        else:
            pairs = translation.translation_pairs(sub)[0]
            texts += [t for p in pairs.values() for pair in p for t in pair]
    tokenizer = text_sources.train_wordpiece(texts, config.wordpiece_vocab)
    max_len = max(sub.max_len for sub in subs.values())
    shared = Shared(tokenizer, make_encoder(with_fields(config, max_len=max_len), len(tokenizer)))
    return {name: make_family(sub, shared=shared) for name, sub in subs.items()}
