"""Where classification texts come from: the built-in datasets, users' files and TFDS catalog
datasets, alone or pooled, split into meta-train / meta-validation / meta-test classes, or
meta-tested on another dataset's classes."""

from __future__ import annotations

import os
import warnings

from metaflax.data import corpora, text_sources

DATASETS = ("cldr", "clinc150", "huffpost", "fewrel")


def is_user_source(name: str) -> bool:
    """A user's labeled file or a TFDS catalog dataset (``tfds:NAME``), not a built-in one."""
    return name.startswith("tfds:") or name.lower().endswith(text_sources.FILE_FORMATS)


def source_name(dataset: str) -> str:
    """How a dataset is called in reports and default workdirs: a file's name without its
    folder and extension (``banking`` for ``/data/banking.jsonl``), joined with ``+``."""
    return "+".join(
        os.path.splitext(os.path.basename(n))[0]
        if is_user_source(n) and not n.startswith("tfds:")
        else n.replace(":", "_").replace("/", "_")
        for n in dataset.split("+")
    )


def is_classification(dataset: str) -> bool:
    """``dataset`` names classification sources only (built-in, files, ``tfds:``; ``+``)."""
    return all(n in DATASETS or is_user_source(n) for n in dataset.split("+"))


def _builtin_split(config, name: str) -> corpora.ClassSplit:
    path = config.data_dir or None
    if name == "cldr":
        lang = config.languages
        return corpora.cldr_language_id(
            min_terms=lang.min_cldr_terms,
            num_test=lang.num_test,
            num_val=lang.num_val,
            seed=lang.split_seed,
        )
    if name == "clinc150":
        return corpora.clinc150(
            test_domains=config.clinc.test_domains, val_domains=config.clinc.val_domains, path=path
        )
    if name == "huffpost":
        return corpora.huffpost(path=path)
    return corpora.fewrel(
        train_domain=config.fewrel.train_domain, test_domain=config.fewrel.test_domain, path=path
    )


def read_source(config, name: str, separator: str = " ") -> text_sources.LabeledTexts:
    """The labeled texts of a user's file or a TFDS catalog dataset (``config.data`` names the
    columns; several text columns are joined with ``separator``)."""
    columns, label = tuple(config.data.text_columns), config.data.label_column
    if name.startswith("tfds:"):
        return corpora.tfds_labeled(
            name[len("tfds:") :],
            split=config.data.tfds_split,
            text_features=columns,
            label_feature=label,
            separator=separator,
        )
    return text_sources.read_labeled_file(
        name, text_columns=columns, label_column=label, separator=separator
    )


def _source_split(config, name: str, separator: str) -> corpora.ClassSplit:
    if not is_user_source(name):
        return _builtin_split(config, name)
    data = read_source(config, name, separator)
    classes = sorted(set(data.labels))
    if config.data.class_split:
        split = corpora.read_class_split(config.data.class_split, classes)
    else:
        split = corpora.random_class_split(
            classes, tuple(config.data.class_fractions), config.data.split_seed
        )
    named = {c for part in split.values() for c in part}
    rows = [i for i, y in enumerate(data.labels) if y in named]
    return corpora.split_by_class(
        [data.texts[i] for i in rows],
        [data.labels[i] for i in rows],
        set(split["val"]),
        set(split["test"]),
    )


def _prefixed(split: corpora.ClassSplit, prefix: str) -> corpora.ClassSplit:
    return corpora.ClassSplit(
        *[[prefix + y for y in part] if i % 2 else part for i, part in enumerate(split)]
    )


def labeled_texts(config, separator: str = " ") -> corpora.ClassSplit:
    """``config.dataset``'s texts and labels split into meta-train, meta-validation and
    meta-test classes (disjoint); the meta-validation classes (none for FewRel) choose the
    baselines' test-time learning rate and are never trained on.

    Several sources (``a+b``) are pooled, their class names prefixed ``<source>:``. With
    ``config.test_dataset`` the meta-test classes are every class of that source (a built-in
    dataset's test classes), and the sources' own test classes join meta-training; the
    validation classes still come from the sources.
    """
    names = config.dataset.split("+")
    splits = [_source_split(config, n, separator) for n in names]
    if config.test_dataset:
        splits = [
            corpora.ClassSplit(
                s.train_texts + s.test_texts,
                s.train_labels + s.test_labels,
                s.val_texts,
                s.val_labels,
                [],
                [],
            )
            for s in splits
        ]
    if len(names) > 1:
        prefixes = [source_name(n) + ":" for n in names]
        splits = [_prefixed(s, p) for p, s in zip(prefixes, splits, strict=True)]
    out = corpora.ClassSplit(*[[x for s in splits for x in s[i]] for i in range(6)])
    if not config.test_dataset:
        return out
    if is_user_source(config.test_dataset):
        test = read_source(config, config.test_dataset, separator)
        texts, labels = test.texts, test.labels
    else:
        test = _builtin_split(config, config.test_dataset)
        texts, labels = test.test_texts, test.test_labels
    shared = sorted(set(labels) & set(out.train_labels + out.val_labels))
    if shared:
        warnings.warn(
            f"{len(shared)} meta-test classes of {config.test_dataset} have the name of a "
            f"meta-training or validation class: {shared[:10]}",
            stacklevel=2,
        )
    return out._replace(test_texts=list(texts), test_labels=list(labels))
