"""Task families beyond labeled classification: translation pairs and self-supervised SMLMT.

Like :func:`metaflax.data.episode_sampler`, each sampler tokenizes its data once and then
returns episodes as a pure function of ``(seed, index)`` with fixed shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from metaflax.core import Episode
from metaflax.data.sampler import meta_batch_fn

Encode = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # texts -> (ids, mask) [n, len]


class TaskSampler(NamedTuple):
    """``episode(seed, index) -> Episode``, ``meta_batch(seed, step, num_tasks) -> Episode``."""

    episode: Callable[[int, int], Episode]
    meta_batch: Callable[[int, int, int], Episode]


def _sampler(episode: Callable[[int, int], Episode]) -> TaskSampler:
    return TaskSampler(episode, meta_batch_fn(episode))


def translation_sampler(
    pairs: dict[str, Sequence[tuple[str, str]]],
    encode_src: Encode,
    encode_tgt: Encode,
    *,
    shots: int,
    queries: int,
) -> TaskSampler:
    """Translation tasks: a task is a language pair (a key of ``pairs``); an episode draws
    ``shots`` support and ``queries`` query sentence pairs of one task.

    Batches are ``{"src", "src_mask", "tgt", "tgt_mask"}`` (``encode_tgt`` should add BOS/EOS).
    Tasks with fewer than ``shots + queries`` pairs are a clear error.
    """
    small = {k: len(v) for k, v in pairs.items() if len(v) < shots + queries}
    if small:
        raise ValueError(
            f"translation tasks with fewer than shots+queries={shots + queries} pairs: {small}; "
            "drop them or lower shots/queries."
        )
    tasks = sorted(pairs)
    encoded = {}
    for task in tasks:  # tokenized once
        src, tgt = zip(*pairs[task], strict=True)
        encoded[task] = (*encode_src(list(src)), *encode_tgt(list(tgt)))

    def episode(seed: int, index: int) -> Episode:
        rng = np.random.default_rng([seed, index])
        src, src_mask, tgt, tgt_mask = encoded[tasks[rng.integers(len(tasks))]]
        rows = rng.choice(len(src), shots + queries, replace=False)

        def half(r):
            return {"src": src[r], "src_mask": src_mask[r], "tgt": tgt[r], "tgt_mask": tgt_mask[r]}

        return Episode(half(rows[:shots]), half(rows[shots:]))

    return _sampler(episode)


def smlmt_sampler(
    sentences: Sequence[str],
    tokenizer,
    *,
    ways: int,
    shots: int,
    queries: int,
    max_len: int,
    min_word_len: int = 3,
) -> TaskSampler:
    """Self-supervised tasks (SMLMT, Bansal et al. 2020) from unlabeled text.

    A task picks ``ways`` words; each class holds ``shots + queries`` sentences that contain its
    word, with every occurrence of the word replaced by the tokenizer's mask token; the label is
    which word was masked. Sentences are tokenized once: candidate words are whole-word tokens
    (alphabetic, >= ``min_word_len`` characters) that occur in enough sentences.
    """
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; SMLMT needs one (e.g. [MASK]).")
    enc = tokenizer(
        list(sentences),
        max_length=max_len,
        truncation=True,
        padding="max_length",
        return_tensors="np",
    )
    ids = enc["input_ids"].astype(np.int32)  # [sentences, max_len]
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    word = re.compile(rf"^[^\W\d_]{{{min_word_len},}}$")
    is_word = np.array([bool(word.match(t)) for t in vocab])
    per_class = shots + queries
    rows_of: dict[int, np.ndarray] = {}
    for token in np.flatnonzero(is_word):
        rows = np.flatnonzero((ids == token).any(axis=1))
        if len(rows) >= per_class:
            rows_of[int(token)] = rows
    candidates = np.array(sorted(rows_of))
    if len(candidates) < ways:
        raise ValueError(
            f"only {len(candidates)} words occur in >= shots+queries={per_class} sentences, "
            f"fewer than ways={ways}; use more text or smaller shots/queries."
        )
    mask_id = tokenizer.mask_token_id
    labels_s = np.repeat(np.arange(ways, dtype=np.int32), shots)
    labels_q = np.repeat(np.arange(ways, dtype=np.int32), queries)

    def episode(seed: int, index: int) -> Episode:
        rng = np.random.default_rng([seed, index])
        words = rng.choice(candidates, ways, replace=False)
        support, query = [], []
        for w in words:
            rows = rng.choice(rows_of[int(w)], per_class, replace=False)
            masked = np.where(ids[rows] == w, mask_id, ids[rows])
            support.append(masked[:shots])
            query.append(masked[shots:])
        s_rows, q_rows = np.concatenate(support), np.concatenate(query)
        return Episode(
            {"tokens": s_rows, "mask": s_rows != tokenizer.pad_token_id, "label": labels_s},
            {"tokens": q_rows, "mask": q_rows != tokenizer.pad_token_id, "label": labels_q},
        )

    return _sampler(episode)
