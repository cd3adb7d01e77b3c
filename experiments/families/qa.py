"""Few-shot extractive QA on XQuAD articles of languages never seen in meta-training (a task is
one article in one language); a BERT encoder with a start/end span head; token-level exact
match and F1."""

from __future__ import annotations

import warnings

import numpy as np

from experiments.families.common import (
    Family,
    Pooled,
    Shared,
    TestAdapt,
    evaluate_chunks,
    make_encoder,
)
from experiments.families.translation import split_languages
from metaflax import heads
from metaflax.data import corpora, families, text_sources

DATASETS = ("xquad",)
METRICS = ("f1", "exact_match")


def qa_examples(config) -> tuple[list, list]:
    """XQuAD ``QAExample``s of the meta-train and meta-test languages (task = language/title)."""
    by_lang = corpora.xquad_examples(path=config.data_dir or None)
    train_langs, test_langs = split_languages(sorted(by_lang), config)
    return [e for k in train_langs for e in by_lang[k]], [e for k in test_langs for e in by_lang[k]]


def _sampler(examples, tokenizer, tokenized, shots, queries, max_len):
    with warnings.catch_warnings():  # answers beyond max_len are dropped (and counted)
        warnings.simplefilter("ignore")
        return families.qa_sampler(
            examples, tokenizer, shots=shots, queries=queries, max_len=max_len, tokenized=tokenized
        )


def qa_family(config, tokenizer=None, shared: Shared | None = None) -> Family:
    """Few-shot extractive QA on articles of languages never seen in meta-training; EM and F1."""
    train_ex, test_ex = qa_examples(config)
    if shared is not None:
        tokenizer = shared.tokenizer
    elif config.tokenizer == "wordpiece":
        tokenizer = text_sources.train_wordpiece(
            [t for e in train_ex for t in (e.question, e.context)], config.wordpiece_vocab
        )
    train_tok = families.tokenize_qa(train_ex, tokenizer, config.max_len)  # once per split
    test_tok = families.tokenize_qa(test_ex, tokenizer, config.max_len)
    pooled, dropped_train, dropped_test = train_tok[0], train_tok[2], test_tok[2]
    sampler = _sampler(train_ex, tokenizer, train_tok, config.shots, config.queries, config.max_len)
    encode_fn, encoder_params, hidden, _ = (
        shared.encoder if shared else make_encoder(config, len(tokenizer))
    )
    loss_fn = heads.span_loss_fn(encode_fn)
    params = heads.init_span_head(encoder_params, hidden)
    per_step = config.meta_batch_size * (config.shots + config.queries)

    def multitask_batch(seed, step):
        rows = np.random.default_rng([seed, step]).choice(len(pooled["start"]), per_step, False)
        return {k: v[rows] for k, v in pooled.items()}

    def span_scores(adapted, episode, k):
        metrics = loss_fn(adapted, episode.query, k)[1]
        return {m: metrics[m] for m in METRICS}

    def evaluate(adapt: TestAdapt, params, shots: int, steps, cfg) -> dict:
        test_sampler = _sampler(
            test_ex, tokenizer, test_tok, shots, cfg.eval.queries, config.max_len
        )
        chunks = evaluate_chunks(span_scores, adapt, params, test_sampler, shots, steps, cfg)
        out = [o for _, o in chunks]
        return {m: np.concatenate([o[m] for o in out])[: cfg.eval.num_episodes] for m in METRICS}

    return Family(
        metrics=METRICS,
        train_metric="f1",
        loss_fn=loss_fn,
        params=params,
        task_init=None,
        meta_batch=sampler.meta_batch,
        evaluate=evaluate,
        to_task_params=lambda p: p,
        info={
            "meta_train_questions": len(train_ex),
            "meta_test_questions": len(test_ex),
            "answers_dropped_beyond_max_len": {"train": dropped_train, "test": dropped_test},
        },
        pooled=Pooled(params, multitask_batch, per_step),
    )
