"""Task families beyond labeled classification: translation pairs and self-supervised SMLMT.

Like :func:`metaflax.data.episode_sampler`, each sampler tokenizes its data once and then
returns episodes as a pure function of ``(seed, index)`` with fixed shapes.
"""

from __future__ import annotations

import re
import warnings
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


class QAExample(NamedTuple):
    """One extractive-QA example: the answer is ``context[answer_start:][:len(answer_text)]``."""

    task: str  # e.g. "<language>/<article title>"
    question: str
    context: str
    answer_text: str
    answer_start: int


def tokenize_qa(examples: Sequence[QAExample], tokenizer, max_len: int):
    """Tokenizes (question, context) pairs once; maps answers to token positions via offsets.

    Returns ``(arrays, kept, dropped)``: ``arrays`` holds ``tokens``, ``mask``, ``start``,
    ``end`` for the kept examples, ``kept`` their indices into ``examples``, and ``dropped``
    the number whose answer fell outside the ``max_len`` window (truncated away) or whose
    question alone does not fit in it.
    """
    # A question that fills the window leaves no room for context (HF raises for the batch).
    question_len = [len(ids) for ids in tokenizer([e.question for e in examples])["input_ids"]]
    fits = [i for i, n in enumerate(question_len) if n + 8 < max_len]
    enc = tokenizer(
        [examples[i].question for i in fits],
        [examples[i].context for i in fits],
        max_length=max_len,
        truncation="only_second",
        padding="max_length",
        return_offsets_mapping=True,
        return_tensors="np",
    )
    starts, ends, kept, rows = [], [], [], []
    for row, i in enumerate(fits):
        e = examples[i]
        seq_ids = enc.sequence_ids(row)
        lo, hi = e.answer_start, e.answer_start + len(e.answer_text)
        start = end = None
        for t, (a, b) in enumerate(enc["offset_mapping"][row]):
            if seq_ids[t] != 1 or b <= a:
                continue
            if start is None and a <= lo < b:
                start = t
            if a < hi <= b:
                end = t
        if start is not None and end is not None and end >= start:
            starts.append(start)
            ends.append(end)
            kept.append(i)
            rows.append(row)
    kept, rows = np.asarray(kept, np.int64), np.asarray(rows, np.int64)
    arrays = {
        "tokens": enc["input_ids"][rows].astype(np.int32),
        "mask": enc["attention_mask"][rows].astype(bool),
        "start": np.asarray(starts, np.int32),
        "end": np.asarray(ends, np.int32),
    }
    return arrays, kept, len(examples) - len(kept)


def qa_sampler(
    examples: Sequence[QAExample],
    tokenizer,
    *,
    shots: int,
    queries: int,
    max_len: int,
    tokenized: tuple | None = None,
) -> TaskSampler:
    """Extractive-QA tasks: a task is a set of paragraphs (``QAExample.task``, e.g. an article in
    one language); support = ``shots`` question/answer pairs, query = ``queries`` held-out ones.

    Batches are ``{"tokens", "mask", "start", "end"}`` for :func:`metaflax.heads.span_loss_fn`.
    Answers outside the window are dropped and counted (a warning); tasks with fewer than
    ``shots + queries`` usable questions are left out. ``tokenized`` reuses the output of
    :func:`tokenize_qa` on the same examples.
    """
    arrays, kept, dropped = tokenized or tokenize_qa(examples, tokenizer, max_len)
    if dropped:
        warnings.warn(
            f"{dropped} of {len(examples)} answers fall outside max_len={max_len} tokens (or "
            "their question fills it) and "
            "were dropped; raise max_len to keep them.",
            stacklevel=2,
        )
    task_of = np.array([examples[i].task for i in kept])
    tasks = [t for t in sorted(set(task_of)) if (task_of == t).sum() >= shots + queries]
    if not tasks:
        raise ValueError(
            f"no task has shots+queries={shots + queries} usable questions; lower them."
        )
    rows_of = {t: np.flatnonzero(task_of == t) for t in tasks}

    def episode(seed: int, index: int) -> Episode:
        rng = np.random.default_rng([seed, index])
        rows = rng.choice(rows_of[tasks[rng.integers(len(tasks))]], shots + queries, replace=False)
        half = lambda r: {k: v[r] for k, v in arrays.items()}  # noqa: E731
        return Episode(half(rows[:shots]), half(rows[shots:]))

    return _sampler(episode)
