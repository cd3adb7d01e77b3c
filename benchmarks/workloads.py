"""The benchmark workloads of metaflax: model, loss, fixed synthetic meta-batch, optimizers.

Shared by ``benchmarks.throughput`` and later benchmarks so every comparison runs the same step.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import metaflax as mf
from metaflax.models import MLP, Conv4, TextClassifier
from metaflax.tasks import mse_loss_fn, sample_sinusoid


def machine() -> str:
    """Where a benchmark ran: ``"<cpu>, <n> cores, <platform> (<device kind>)"``."""
    device = jax.devices()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{device.platform} ({device.device_kind})"
    )


def run_info() -> dict:
    """``{"date", "machine", "jax"}``: the head of a benchmark's JSON result."""
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "jax": jax.__version__}


def calls_per_second(fn, seconds: float) -> float:
    """How many times per second ``fn()`` runs (it must block until done), after one warm-up
    call (compilation)."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def cost_flops(cost) -> float:
    """``cost_analysis()["flops"]`` of a lowered or compiled jitted function (a dict, or a
    one-element list of dicts in older jax)."""
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


class Workload(NamedTuple):
    name: str
    loss_fn: Any
    params: Any
    episodes: mf.Episode  # [tasks, ...]
    inner_lr: float
    outer_lr: float


def classification_loss_fn(apply_fn, inputs=("x",)):
    """Cross-entropy ``loss_fn`` for batches ``{*inputs, "label"}``; reports accuracy."""

    def loss_fn(params, batch, key):
        del key
        logits = apply_fn(params, *(batch[k] for k in inputs))
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32
        labels = batch["label"]
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    return loss_fn


def _labels(tasks, ways, per_class):
    return jnp.tile(jnp.repeat(jnp.arange(ways), per_class)[None], (tasks, 1))


def sinusoid() -> Workload:
    """MLP 1-40-40-1 ReLU, support 10, query 10, meta-batch 25, inner SGD 0.01, outer Adam 1e-3."""
    apply_fn, params = mf.functionalize(MLP([1, 40, 40, 1], rngs=nnx.Rngs(0)))
    episodes, _ = sample_sinusoid(jax.random.key(0), 25, 10, 10)
    return Workload("sinusoid", mse_loss_fn(apply_fn), params, episodes, 0.01, 1e-3)


def conv4(model_cls=Conv4) -> Workload:
    """Conv4 (64 ch) on 28x28x1, 5-way 1-shot, 15 queries per class, meta-batch 32, SGD 0.4."""
    tasks, ways, shots, queries = 32, 5, 1, 15
    apply_fn, params = mf.functionalize(model_cls(ways, rngs=nnx.Rngs(0)))
    ks, kq = jax.random.split(jax.random.key(0))
    episodes = mf.Episode(
        support={
            "x": jax.random.uniform(ks, (tasks, ways * shots, 28, 28, 1)),
            "label": _labels(tasks, ways, shots),
        },
        query={
            "x": jax.random.uniform(kq, (tasks, ways * queries, 28, 28, 1)),
            "label": _labels(tasks, ways, queries),
        },
    )
    return Workload("conv4", classification_loss_fn(apply_fn), params, episodes, 0.4, 1e-3)


def encoder() -> Workload:
    """2-layer pre-LN Transformer (d=128, 4 heads, MLP 512, vocab 8000, seq 32), 5-way 5-shot,
    5 queries per class, meta-batch 8, inner SGD 0.01."""
    tasks, ways, shots, queries, seq, vocab = 8, 5, 5, 5, 32, 8000
    model = TextClassifier(vocab, ways, max_len=seq, rngs=nnx.Rngs(0))
    apply_fn, params = mf.functionalize(model)

    def half(key, per_class):
        n = ways * per_class
        k1, k2 = jax.random.split(key)
        lengths = jax.random.randint(k2, (tasks, n, 1), seq // 2, seq + 1)
        return {
            "tokens": jax.random.randint(k1, (tasks, n, seq), 1, vocab),
            "mask": jnp.arange(seq)[None, None] < lengths,
            "label": _labels(tasks, ways, per_class),
        }

    ks, kq = jax.random.split(jax.random.key(0))
    episodes = mf.Episode(half(ks, shots), half(kq, queries))
    loss_fn = classification_loss_fn(apply_fn, inputs=("tokens", "mask"))
    return Workload("encoder", loss_fn, params, episodes, 0.01, 1e-3)


WORKLOADS = {"sinusoid": sinusoid, "conv4": conv4, "encoder": encoder}


def make_algorithm(name: str, w: Workload, num_inner_steps: int, **kw) -> mf.MetaAlgorithm:
    """An algorithm of :data:`metaflax.ALGORITHMS` on a workload with its inner SGD rate and
    outer Adam."""
    return mf.make_algorithm(
        name,
        w.loss_fn,
        outer_tx=optax.adam(w.outer_lr),
        inner_lr=w.inner_lr,
        num_inner_steps=num_inner_steps,
        **kw,
    )
