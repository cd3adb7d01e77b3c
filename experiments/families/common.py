"""What every task family shares: the :class:`Family` contract, the encoder and the evaluation
loop over held-out episodes."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import metaflax as mf
from metaflax import bert, heads
from metaflax.data import builders

# adapt(params, support, key, num_steps) -> adapted params, as a method adapts at test time.
TestAdapt = Callable[[Any, Any, jax.Array, int], Any]


class Pooled(NamedTuple):
    """The multi-task baseline's part: one model over all meta-training data, trained on pooled
    batches ``batch(seed, step)`` of ``examples_per_step`` examples (as many as a meta-batch
    holds)."""

    params: Any
    batch: Callable[[int, int], Any]
    examples_per_step: int


class ClassBaselines(NamedTuple):
    """What classification adds for ProtoNet and the baselines.

    Attributes:
      proto_init: ``task_init(params, support)`` with the prototype head (ProtoNet's classifier,
        and where the fine-tuned baselines start at test time).
      val_evaluate: like ``Family.evaluate``, on the meta-validation classes (every learned
        method's "val" score, which chooses the baselines' test-time learning rate); None where
        the dataset has none.
      centroid_evaluate: ``(shots, cfg, weighted=False) -> {metric: [episodes]}`` of the
        no-learning floor (n-gram nearest centroid; ``weighted``: tf-idf) on the test episodes.
      export: ``export(path, method, params, cfg, test_lr)`` writes a trained classifier for
        :mod:`experiments.adapt`; None in mixed runs.
      ridge_init: ``task_init(params, support)`` with the ridge-regression head (R2D2).
    """

    proto_init: Callable
    val_evaluate: Callable | None
    centroid_evaluate: Callable
    export: Callable | None = None
    ridge_init: Callable | None = None


class Family(NamedTuple):
    """One task family, as the trainer sees it.

    Attributes:
      metrics: per-episode metrics reported, the first one in the results table.
      train_metric: the ``loss_fn`` metric shown during training (e.g. ``accuracy``).
      loss_fn: ``loss_fn(params, batch, key) -> (loss, metrics)``.
      params: initial parameters of the per-task model (meta-learning and ``scratch``).
      task_init: ``task_init(params, support)`` at the start of every task, or None.
      meta_batch: ``meta_batch(seed, step, num_tasks) -> Episode`` of meta-training tasks.
      evaluate: ``evaluate(adapt, params, shots, steps, cfg) -> {metric: [episodes, steps]}`` on
        meta-test tasks, the same episodes for every method.
      to_task_params: turns a baseline's parameters into per-task ones (e.g. a fresh head).
      info: sizes, for the report.
      pooled: the multi-task baseline's model and batches; None without labeled meta-training
        data (SMLMT).
      classes: ProtoNet's and the floors' parts; None outside classification.
    """

    metrics: tuple[str, ...]
    train_metric: str
    loss_fn: Callable
    params: Any
    task_init: Callable | None
    meta_batch: Callable
    evaluate: Callable
    to_task_params: Callable
    info: dict
    pooled: Pooled | None
    classes: ClassBaselines | None = None

    @property
    def baseline_init(self) -> Callable | None:
        """Where the fine-tuned methods start each test task (the prototype head, if any)."""
        return self.classes.proto_init if self.classes else None

    def method_init(self, method: str) -> Callable | None:
        """The ``task_init`` ``method`` meta-trains and adapts with: the prototype head for
        ProtoNet, the ridge head for R2D2 (classification only), else ``task_init``."""
        if method not in ("protonet", "r2d2"):
            return self.task_init
        if self.classes is None:
            raise ValueError(f"{method} is a classification method; this family has no classes.")
        return self.classes.proto_init if method == "protonet" else self.classes.ridge_init


class Encoder(NamedTuple):
    """The text encoder of a family (:func:`make_encoder`).

    Attributes:
      encode_fn: ``encode_fn(params, inputs, mask) -> (sequence, pooled)``.
      params: its initial (trained) parameters.
      hidden: the pooled vector's width.
      trunk: with ``model.train_layers >= 0``, the frozen lower part of the pretrained encoder:
        ``inputs`` are then its outputs (:func:`inputs`), not token ids. None otherwise.
    """

    encode_fn: Callable
    params: Any
    hidden: int
    trunk: bert.FrozenTrunk | None = None


class Shared(NamedTuple):
    """A tokenizer and encoder shared by several families in one (mixed) meta-training run."""

    tokenizer: Any  # an HF tokenizer with [CLS]/[SEP]/[PAD]
    encoder: Encoder


def make_encoder(config, vocab_size: int, idf: np.ndarray | None = None) -> Encoder:
    """BERT from scratch or from ``model.hf_path``. ``model.pool="mean+bow"`` needs ``idf``,
    the IDF in the meta-training text of each token (``ngram=1``) or n-gram bucket
    (:func:`bag_width` wide). ``model.train_layers=k >= 0`` (a pretrained encoder) trains only
    its top ``k`` blocks, the pooler and what sits above: ``encode_fn`` then reads the frozen
    trunk's outputs (:func:`inputs`)."""
    trunk = None
    if config.model.hf_path:
        pretrained = bert.from_pretrained(config.model.hf_path, seed=config.seed)
        if config.model.train_layers >= 0:
            trunk = bert.freeze_trunk(pretrained.encoder, config.model.train_layers)
            apply_fn, params = trunk.top_fn, trunk.top_params
        else:
            apply_fn, params = mf.functionalize(pretrained.encoder)
        hidden = pretrained.config.hidden_size
    else:
        cfg = bert.BertConfig(
            vocab_size=vocab_size,
            hidden_size=config.model.hidden,
            num_hidden_layers=config.model.layers,
            num_attention_heads=config.model.heads,
            intermediate_size=config.model.mlp,
            max_position_embeddings=config.max_len,
            pre_ln=True,
        )
        apply_fn, params = mf.functionalize(bert.BertEncoder(cfg, rngs=nnx.Rngs(config.seed)))
        hidden = cfg.hidden_size
    if config.model.pool == "cls":  # BERT's pooler on the first token
        return Encoder(lambda p, tokens, mask: apply_fn(p, tokens, mask), params, hidden, trunk)

    encode_fn = heads.mean_pooled(apply_fn)
    if config.model.pool == "mean+bow":  # families.check_config: a classification dataset
        encode_fn, params = heads.with_bag_of_words(
            encode_fn, params, idf, config.ngram, config.model.bow_scale
        )
        hidden += len(idf)
    return Encoder(encode_fn, params, hidden, trunk)


def inputs(encoder: Encoder, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """What ``encoder.encode_fn`` reads for token ids ``tokens``: the ids, or with a frozen
    trunk its outputs, computed once per text and cached under ``METAFLAX_CACHE_DIR``."""
    if encoder.trunk is None:
        return tokens
    return bert.trunk_features(
        encoder.trunk, tokens, mask, cache_dir=os.path.join(builders.cache_dir(), "trunk")
    )


def bag_width(config, vocab_size: int) -> int:
    """The width of ``mean+bow``'s bag: the vocabulary (``ngram=1``) or ``model.bow_buckets``."""
    return vocab_size if config.ngram == 1 else config.model.bow_buckets


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out episodes.


def test_chunks(sampler, shots: int, cfg):
    """``(i, episodes)``: the meta-test episodes, ``eval.chunk`` at a time. They depend only on
    ``eval.seed`` and ``shots``, so every method sees the same ones."""
    for i in range(-(-cfg.eval.num_episodes // cfg.eval.chunk)):
        yield i, sampler.meta_batch(cfg.eval.seed + shots, i, cfg.eval.chunk)


@functools.lru_cache(maxsize=64)
def _chunk_program(score: Callable, adapt: TestAdapt, steps: tuple, batch: int) -> Callable:
    """``run(params, episodes, key)``: per episode of the chunk, ``score(adapted, episode, key)``
    after each of ``steps`` adaptation steps, stacked ``[steps, ...]``; jitted, ``batch``
    episodes in parallel. One compiled program per ``(score, adapt)``: validation and test
    classes, every shots setting and the fine-tuned methods (one ``adapt``, see
    :func:`fine_tune_adapt`) share it."""

    def one(params, episode, k):
        out = [score(adapt(params, episode.support, k, n), episode, k) for n in steps]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *out)

    @jax.jit
    def run(params, episodes, key):
        keys = jax.random.split(key, jax.tree.leaves(episodes)[0].shape[0])
        return jax.lax.map(lambda x: one(params, *x), (episodes, keys), batch_size=batch)

    return run


def evaluate_chunks(score: Callable, adapt: TestAdapt, params, sampler, shots, steps, cfg):
    """``(episodes, outputs)`` of :func:`_chunk_program` per chunk of :func:`test_chunks`, on
    the host."""
    run = _chunk_program(score, adapt, tuple(steps), cfg.eval.batch)
    for i, episodes in test_chunks(sampler, shots, cfg):
        yield episodes, jax.device_get(run(params, episodes, jax.random.key(cfg.eval.seed + i)))


@functools.lru_cache(maxsize=64)  # one function per family, so its evaluation compiles once
def fine_tune_adapt(loss_fn, task_init) -> TestAdapt:
    """The baselines' test-time adaptation of ``(params, lr)``: ``task_init`` then SGD steps at
    ``lr`` on the support set. ``lr`` is an input of the compiled evaluation, not a constant in
    it: one program serves every learning rate of the grid and every fine-tuned method."""

    def adapt(params_lr, support, key, num_steps):
        params, lr = params_lr
        if num_steps == 0:
            return params if task_init is None else task_init(params, support)
        fn = mf.make_adapt_fn(loss_fn, optax.sgd(lr), num_steps, task_init=task_init)
        return fn(params, support, key)[0]

    return adapt
