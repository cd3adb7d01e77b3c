"""N-way K-shot episode sampling over pre-tokenized labeled examples.

Sampling is a pure function of ``(seed, episode index)``: an iterator resumes exactly from a
checkpointed index, and the same seed gives the same episodes, bit for bit. Shapes are fixed
(``ways * shots`` support and ``ways * queries`` query rows of ``max_len`` tokens), so a jitted
step never retraces. Labels are permuted per episode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from metaflax.core import Episode


class LabeledTokens(NamedTuple):
    """Tokenized examples of one split: ``tokens``/``mask`` ``[n, max_len]``, ``labels`` ``[n]``,
    and ``class_names`` (label ``i`` is ``class_names[i]``)."""

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def class_split(data: LabeledTokens, classes: list[str]) -> LabeledTokens:
    """The examples of ``classes`` only (a meta-train / meta-val / meta-test split by class)."""
    unknown = sorted(set(classes) - set(data.class_names))
    if unknown:
        raise ValueError(f"unknown classes {unknown[:5]}; valid names: {data.class_names[:10]}...")
    index = {name: i for i, name in enumerate(data.class_names)}
    old = np.array([index[c] for c in classes], dtype=np.int64)
    keep = np.isin(data.labels, old)
    remap = np.full(len(data.class_names), -1)
    remap[old] = np.arange(len(classes))
    return LabeledTokens(
        data.tokens[keep], data.mask[keep], remap[data.labels[keep]], tuple(classes)
    )


class _Index(NamedTuple):
    classes: np.ndarray  # usable class ids
    members: list[np.ndarray]  # example rows of each usable class


def _usable(data: LabeledTokens, ways: int, per_class: int) -> _Index:
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    small = [data.class_names[c] for c in np.flatnonzero(counts < per_class)]
    if small:
        warnings.warn(
            f"{len(small)} classes have fewer than shots+queries={per_class} examples and are "
            f"excluded: {small[:20]}{' ...' if len(small) > 20 else ''}",
            stacklevel=4,
        )
    classes = np.flatnonzero(counts >= per_class)
    if len(classes) < ways:
        raise ValueError(
            f"only {len(classes)} classes have >= shots+queries={per_class} examples, fewer than "
            f"ways={ways}; lower ways, shots or queries, or use a split with more classes."
        )
    return _Index(classes, [np.flatnonzero(data.labels == c) for c in classes])


class EpisodeSampler(NamedTuple):
    """Pure functions of ``(seed, index)`` built by :func:`episode_sampler`.

    Attributes:
      episode: ``episode(seed, index) -> Episode`` with ``support`` / ``query`` dicts
        ``{"tokens", "mask", "label"}`` of ``ways * shots`` / ``ways * queries`` rows.
      meta_batch: ``meta_batch(seed, step, num_tasks) -> Episode`` with a leading [tasks] axis:
        episodes ``step * num_tasks, ..., step * num_tasks + num_tasks - 1``.
      num_classes: the number of usable classes.
    """

    episode: Callable[[int, int], Episode]
    meta_batch: Callable[[int, int, int], Episode]
    num_classes: int


def episode_sampler(data: LabeledTokens, *, ways: int, shots: int, queries: int) -> EpisodeSampler:
    """N-way K-shot sampling over ``data``; classes with < shots + queries examples excluded.

    >>> import numpy as np
    >>> data = LabeledTokens(np.arange(40).reshape(20, 2), np.ones((20, 2), bool),
    ...                      np.arange(20) % 4, ("a", "b", "c", "d"))
    >>> sampler = episode_sampler(data, ways=3, shots=1, queries=2)
    >>> ep = sampler.episode(seed=0, index=7)
    >>> ep.support["tokens"].shape, ep.query["label"].tolist()
    ((3, 2), [0, 0, 1, 1, 2, 2])
    """
    for name, v in (("ways", ways), ("shots", shots), ("queries", queries)):
        if v < 1:
            raise ValueError(f"{name}={v} must be >= 1.")
    idx = _usable(data, ways, shots + queries)
    labels_s = np.repeat(np.arange(ways, dtype=np.int32), shots)
    labels_q = np.repeat(np.arange(ways, dtype=np.int32), queries)

    def episode(seed: int, index: int) -> Episode:
        rng = np.random.default_rng([seed, index])
        chosen = rng.choice(len(idx.classes), ways, replace=False)  # order = permuted labels
        picks = [rng.choice(idx.members[c], shots + queries, replace=False) for c in chosen]
        rows_s = np.concatenate([p[:shots] for p in picks])
        rows_q = np.concatenate([p[shots:] for p in picks])
        return Episode(_rows(data, rows_s, labels_s), _rows(data, rows_q, labels_q))

    return EpisodeSampler(episode, meta_batch_fn(episode), len(idx.classes))


def meta_batch_fn(episode: Callable[[int, int], Episode]) -> Callable[[int, int, int], Episode]:
    """``meta_batch(seed, step, num_tasks)``: episodes ``step * num_tasks + t`` stacked on a
    leading [tasks] axis."""

    def meta_batch(seed: int, step: int, num_tasks: int) -> Episode:
        eps = [episode(seed, step * num_tasks + t) for t in range(num_tasks)]
        return Episode(
            *(
                {k: np.stack([getattr(e, half)[k] for e in eps]) for k in eps[0].support}
                for half in ("support", "query")
            )
        )

    return meta_batch


def _rows(data, rows, labels):
    return {"tokens": data.tokens[rows], "mask": data.mask[rows], "label": labels}
