"""Second-order MAML on a BERT-base encoder on one accelerator: tasks/s, memory and MFU.

    python -m benchmarks.gpu                      # BERT-base, bf16, 1 inner step; minutes on a GPU
    python -m benchmarks.gpu --precision fp32     # the same step in float32
    python -m benchmarks.gpu --inner-steps 1,5    # also 5 inner steps (remat)
    python -m benchmarks.gpu --tiny               # a 2-layer d=128 model on CPU, seconds
    python -m benchmarks.gpu --compile-only       # memory and FLOPs of the step, without running it

The model is metaflax's own :class:`metaflax.bert.BertEncoder` at BERT-base size (12 layers,
d=768, 12 heads, MLP 3072, vocab 30522; post-LN as in BERT) with a linear head on the pooled
[CLS] output (``metaflax.heads.classification_loss_fn``), on synthetic 5-way 5-shot tasks with 5
queries per class and sequences of 128 tokens, a meta-batch of 8 tasks (vmapped; halved
until the compiled step fits the device). MAML is second order with inner SGD (remat for more
than one inner step); ``bf16`` wraps the loss in ``mf.mixed_precision`` (bf16 compute, float32
params, optimizer states and meta-gradients). Results go to
``benchmarks/results/gpu-<device>.json``.

FLOPs, three ways:

- ``model_flops``, analytic (used for MFU), matmuls only (the usual convention: elementwise ops,
  softmax and norms are left out, recomputation from remat is not counted). A forward pass over
  ``n`` sequences of ``T`` tokens costs
  ``F(n) = n*T*L*(2*(4*d^2 + 2*d*f) + 4*T*d) + n*(2*d^2 + 2*d*ways)``: ``2 * matmul params`` per
  token per layer (Q, K, V, output: ``4 d^2``; MLP: ``2 d f``), ``4 T d`` per token per layer
  for the attention scores and the weighted sum, and the pooler and head on the [CLS] token.
  A backward pass costs ``2 F`` (gradients for both operands of every matmul). One inner step is
  a forward and a backward pass on the support set (``3 F_s``: per weight, ``y = x W`` forward,
  ``dW = x^T dy`` and ``dx = dy W^T`` backward); the outer backward pass differentiates all
  three again, each with respect to both operands (``6 F_s``); the query loss costs ``3 F_q``
  (forward, and backward to the adapted params). Per task,
  ``MAML(k) = 9 k F_s + 3 F_q`` (k inner steps; ``F_s``, ``F_q``: forward on the support and
  query sets). The outer Adam update (~10 FLOPs per parameter) is left out.
- ``xla_flops``: ``jax.jit(step).lower(...).cost_analysis()['flops']``, XLA's count for the
  step's HLO before optimisation, with the task map and inner loop written out
  (``task_map="vmap"``, no remat: the 1-step default as it runs; for more steps only with
  ``--check-flops``, as tracing the written-out step takes minutes). Counts every op,
  elementwise included. At BERT-base size (checked on CPU) the analytic count is 98.3% of
  XLA's for a forward pass and 99.5% for the MAML step with 1 and with 5 inner steps.
- ``xla_flops_compiled``: ``compiled.cost_analysis()['flops']`` of the step that runs. XLA
  counts a while loop's body once, so with remat (a loop over inner steps) or a chunked task map
  this is a lower bound, not the work done.

MFU = ``model_flops`` per step x steps/s / the chip's dense bf16 peak (``PEAK_TFLOPS``; also for
fp32 runs, then read it as a fraction of the bf16 peak). Target on an H200: >= 40% for bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import metaflax as mf
from benchmarks.workloads import cost_flops
from metaflax import bert, heads

# Dense bf16 peak TFLOP/s per chip, matched in order against jax's device_kind.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0),
    ("TPU v4", 275.0),
)


_BERT_BASE = bert.BertConfig()  # the model defaults below


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark run; the defaults are BERT-base on one H200."""

    vocab_size: int = _BERT_BASE.vocab_size
    hidden: int = _BERT_BASE.hidden_size
    layers: int = _BERT_BASE.num_hidden_layers
    num_heads: int = _BERT_BASE.num_attention_heads
    mlp: int = _BERT_BASE.intermediate_size
    seq_len: int = 128
    ways: int = 5
    shots: int = 5
    queries: int = 5
    # XLA:CPU's memory analysis puts a task at ~1.1 GB per layer at this size (second order
    # keeps the inner forward and backward passes; CPU computes bf16 in f32, so that is an
    # upper bound): 8 tasks x 12 layers fit an H200's 141 GB. A chunked task_map
    # (--task-chunk) keeps one chunk's intermediates at a time instead.
    meta_batch: int = 8
    task_map: str | int = "vmap"
    inner_steps: tuple[int, ...] = (1,)
    precision: str = "bf16"
    inner_lr: float = 1e-2
    outer_lr: float = 1e-5
    seconds: float = 30.0  # timed, after two warm-up steps
    peak_tflops: float | None = None  # overrides PEAK_TFLOPS
    check_flops: bool = False  # XLA's count also for k > 1 or a chunked task_map (slow)

    @classmethod
    def tiny(cls, **overrides) -> Config:
        """CPU size: 2 layers, d=128, seq 32, 2 tasks of 5-way 2-shot."""
        base = dict(vocab_size=1000, hidden=128, layers=2, num_heads=2, mlp=512, seq_len=32)
        base.update(shots=2, queries=2, meta_batch=2, seconds=2.0)
        return cls(**{**base, **overrides})

    def bert_config(self) -> bert.BertConfig:
        return bert.BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.mlp,
            max_position_embeddings=max(512, self.seq_len),
        )


def forward_flops(cfg: Config, num_seqs: int) -> float:
    """Matmul FLOPs of one forward pass (encoder, pooler, head) over ``num_seqs`` sequences."""
    d, f, t = cfg.hidden, cfg.mlp, cfg.seq_len
    per_token = cfg.layers * (2 * (4 * d * d + 2 * d * f) + 4 * t * d)
    return num_seqs * t * per_token + num_seqs * (2 * d * d + 2 * d * cfg.ways)


def model_flops(cfg: Config, inner_steps: int) -> float:
    """Analytic matmul FLOPs of one second-order MAML step: tasks * (9 k F_s + 3 F_q)."""
    f_s = forward_flops(cfg, cfg.ways * cfg.shots)
    f_q = forward_flops(cfg, cfg.ways * cfg.queries)
    return cfg.meta_batch * (9 * inner_steps * f_s + 3 * f_q)


def setup(cfg: Config, seed: int = 0):
    """``(loss_fn, params, episodes)``: the encoder + head, its loss and a synthetic meta-batch."""
    encoder = bert.BertEncoder(cfg.bert_config(), rngs=nnx.Rngs(seed))
    encode_fn, encoder_params = mf.functionalize(encoder)
    k_head, k_s, k_q = jax.random.split(jax.random.key(seed), 3)
    params = heads.init_classifier(encoder_params, cfg.hidden, cfg.ways)
    # a random head: a zero one would make the first inner gradient of the encoder exactly zero
    params["head"]["kernel"] = 0.02 * jax.random.normal(k_head, (cfg.hidden, cfg.ways))
    loss_fn = heads.classification_loss_fn(encode_fn)
    if cfg.precision == "bf16":
        loss_fn = mf.mixed_precision(loss_fn)
    elif cfg.precision != "fp32":
        raise ValueError(f"precision={cfg.precision!r} is not valid; use 'bf16' or 'fp32'.")

    def half(key, per_class):  # [tasks, ways*per_class, seq]
        n, t = cfg.ways * per_class, cfg.seq_len
        k1, k2 = jax.random.split(key)
        lengths = jax.random.randint(k2, (cfg.meta_batch, n, 1), t // 2, t + 1)
        return {
            "tokens": jax.random.randint(k1, (cfg.meta_batch, n, t), 1, cfg.vocab_size),
            "mask": jnp.arange(t)[None, None] < lengths,
            "label": jnp.tile(jnp.repeat(jnp.arange(cfg.ways), per_class), (cfg.meta_batch, 1)),
        }

    return loss_fn, params, mf.Episode(half(k_s, cfg.shots), half(k_q, cfg.queries))


def make_maml(cfg: Config, loss_fn, inner_steps: int, *, remat=None, task_map=None):
    return mf.maml(
        loss_fn,
        inner_tx=optax.sgd(cfg.inner_lr),
        outer_tx=optax.adam(cfg.outer_lr),
        num_inner_steps=inner_steps,
        remat=inner_steps > 1 if remat is None else remat,
        task_map=cfg.task_map if task_map is None else task_map,
    )


def peak_tflops(cfg: Config, device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops
    return next((p for name, p in PEAK_TFLOPS if name.lower() in device.device_kind.lower()), None)


class _DoesNotFit(Exception):
    pass


def measure(cfg: Config, inner_steps: int, compile_only: bool = False) -> dict:
    """Compiles and times one MAML configuration; returns the JSON row.

    Raises ``_DoesNotFit`` when XLA's memory analysis of the compiled step exceeds the device's
    memory (accelerators only), before running it.
    """
    device = jax.devices()[0]
    loss_fn, params, episodes = setup(cfg)
    alg = make_maml(cfg, loss_fn, inner_steps)
    state, key = alg.init(params), jax.random.key(0)
    step = jax.jit(alg.step, donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, episodes, key)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # XLA's FLOP count of the step with nothing in a loop (XLA counts a loop body once)
    if inner_steps == 1 and cfg.task_map == "vmap":  # the step itself: no remat, no loop
        xla_flops = cost_flops(lowered.cost_analysis())
    elif cfg.check_flops:  # tracing the written-out step takes minutes at BERT-base size
        flat = make_maml(cfg, loss_fn, inner_steps, remat=False, task_map="vmap")
        xla_flops = cost_flops(jax.jit(flat.step).lower(state, episodes, key).cost_analysis())
    else:
        xla_flops = None
    mem = compiled.memory_analysis()
    row = {
        "inner_steps": inner_steps,
        "remat": inner_steps > 1,
        "meta_batch": cfg.meta_batch,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "compile_s": compile_s,
        "model_flops": model_flops(cfg, inner_steps),
        "xla_flops": xla_flops,
        "xla_flops_compiled": cost_flops(compiled.cost_analysis()),
        "xla_memory_bytes": mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes,
        "xla_temp_bytes": mem.temp_size_in_bytes,
    }
    row["model_over_xla_flops"] = row["model_flops"] / xla_flops if xla_flops else None
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit and row["xla_memory_bytes"] > limit:
        raise _DoesNotFit(f"{row['xla_memory_bytes'] / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB")
    if compile_only:
        return row
    for i in range(2):  # warm-up
        state, metrics = compiled(state, episodes, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < cfg.seconds:
        state, metrics = compiled(state, episodes, jax.random.fold_in(key, steps + 2))
        steps += 1
        if steps % 5 == 0:
            jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    mf.check_finite(metrics)
    stats = device.memory_stats() or {}
    peak = peak_tflops(cfg, device)
    row.update(
        steps_timed=steps,
        step_s=seconds / steps,
        steps_per_s=steps / seconds,
        tasks_per_s=cfg.meta_batch * steps / seconds,
        loss=float(metrics["loss"]),
        peak_bytes_in_use=stats.get("peak_bytes_in_use"),
        bytes_limit=stats.get("bytes_limit"),
        model_tflops_per_s=row["model_flops"] * steps / seconds / 1e12,
        xla_tflops_per_s=xla_flops * steps / seconds / 1e12 if xla_flops else None,
        peak_tflops=peak,
    )
    row["mfu"] = row["model_tflops_per_s"] / peak if peak else None
    return row


def device_slug(device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-") or device.platform


def _fitting(cfg: Config, k: int, compile_only: bool) -> dict:
    """``measure``, halving the meta-batch until the step fits the device."""
    while True:
        try:
            return measure(cfg, k, compile_only)
        except (_DoesNotFit, jax.errors.JaxRuntimeError) as e:
            if isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" not in str(e):
                raise
            if cfg.meta_batch == 1:
                raise SystemExit(f"one task does not fit on this device ({e}).") from e
            print(f"k={k}: a meta-batch of {cfg.meta_batch} does not fit ({e}); halving it")
            cfg = dataclasses.replace(cfg, meta_batch=cfg.meta_batch // 2)


def run(cfg: Config, out_dir: str | None, *, compile_only: bool = False, tag: str = "") -> dict:
    """Measures every ``cfg.inner_steps``; writes ``gpu-<device><tag>.json`` to ``out_dir``."""
    device = jax.devices()[0]
    rows = []
    for k in cfg.inner_steps:
        row = _fitting(cfg, k, compile_only)
        rows.append(row)
        gib = (row.get("peak_bytes_in_use") or row["xla_memory_bytes"]) / 2**30
        line = (
            f"k={k} remat={row['remat']} meta-batch {row['meta_batch']}: compile "
            f"{row['compile_s']:.0f} s, model {row['model_flops'] / 1e12:.2f} TFLOP/step (XLA "
            f"{(row['xla_flops'] or float('nan')) / 1e12:.2f}), {gib:.1f} GiB"
        )
        if not compile_only:
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a (unknown peak)"
            line += (
                f", {row['steps_per_s']:.2f} steps/s, {row['tasks_per_s']:.1f} tasks/s, "
                f"{row['model_tflops_per_s']:.1f} TFLOP/s, MFU {mfu}"
            )
        print(line, flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": device.device_kind,
        "platform": device.platform,
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "jax": jax.__version__,
        "config": dataclasses.asdict(cfg),
        "peak_known": peak_tflops(cfg, device) is not None,
        "flops_note": "model_flops: analytic matmul FLOPs (MFU numerator); xla_flops: XLA's "
        "count of the unoptimised HLO with nothing in a loop; xla_flops_compiled: XLA's count "
        "of the compiled step (loop bodies counted once)",
        "rows": rows,
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"gpu-{device_slug(device)}{tag}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="2-layer d=128 model (CPU, seconds)")
    p.add_argument("--compile-only", action="store_true", help="memory and FLOPs, no steps")
    p.add_argument("--inner-steps", help="comma-separated, e.g. 1,5 (k > 1 uses remat)")
    p.add_argument("--meta-batch", type=int)
    p.add_argument("--task-chunk", type=int, help="tasks vmapped at a time; 0: all (vmap)")
    p.add_argument("--precision", choices=("bf16", "fp32"))
    p.add_argument("--layers", type=int)
    p.add_argument("--seconds", type=float, help="timed seconds per configuration")
    p.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak, if not known")
    p.add_argument("--check-flops", action="store_true", help="XLA's FLOP count for k > 1 too")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    # JAX preallocates 75% of GPU memory by default; second-order MAML wants most of it
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    overrides = {
        "inner_steps": tuple(map(int, args.inner_steps.split(","))) if args.inner_steps else None,
        "meta_batch": args.meta_batch,
        "task_map": None if args.task_chunk is None else (args.task_chunk or "vmap"),
        "precision": args.precision,
        "layers": args.layers,
        "seconds": args.seconds,
        "peak_tflops": args.peak_tflops,
        "check_flops": args.check_flops or None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = Config.tiny(**overrides) if args.tiny else Config(**overrides)
    if cfg.meta_batch < 1:
        raise SystemExit(f"--meta-batch={cfg.meta_batch} must be >= 1.")
    if jax.devices()[0].platform == "cpu" and not args.tiny and not args.compile_only:
        print("warning: no accelerator; BERT-base steps on CPU take minutes (try --tiny)")
    run(cfg, args.out, compile_only=args.compile_only, tag="-tiny" * args.tiny)


if __name__ == "__main__":
    main()
