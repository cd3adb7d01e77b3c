"""Mixed precision (bf16 compute, fp32 params): its effect on speed and meta-gradient accuracy.

    python -m benchmarks.precision                   # sinusoid and encoder, 1 inner step
    python -m benchmarks.precision --workloads encoder --inner-steps 1,5 --seconds 4

bf16 is ``mf.mixed_precision(loss_fn)``: params, optimizer states and meta-gradients stay
float32, the model computes in bfloat16. For each workload it reports

- speed: tasks/s of the jitted, donated MAML step in float32 and in bf16, timed in alternating
  rounds in one process (the first round compiles and warms up and is not counted);
- accuracy: the bf16 and float32 meta-gradients (``alg.meta_grad`` at the initial params, same
  key) against a float64 reference computed under ``jax.enable_x64`` with the params and
  episodes cast to float64: relative L2 error ``|g - g_ref| / |g_ref|`` and cosine similarity,
  overall and split into matrices (kernels, embeddings: ndim >= 2) and vectors (biases,
  normalisation scales). bf16 is also compared with float32 directly;
- the backend's matmul alone (1024 x 1024, GFLOP/s): float32, bfloat16 with a bfloat16 result
  (what the model's layers ask for), and bfloat16 accumulating into float32
  (``preferred_element_type``).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import metaflax as mf
from benchmarks import report
from benchmarks.workloads import WORKLOADS, Workload, calls_per_second, make_algorithm, run_info
from metaflax.core import check_episodes

PRECISIONS = ("fp32", "bf16")


def _with_precision(w: Workload, precision: str) -> Workload:
    return w._replace(loss_fn=mf.mixed_precision(w.loss_fn)) if precision == "bf16" else w


def _to_float64(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def meta_gradients(w: Workload, num_inner_steps: int) -> tuple[dict, list[float]]:
    """The MAML meta-gradient's leaves (float64 numpy) in fp32, bf16 and the fp64 reference,
    and the fp32 mean support loss before each inner step."""
    key = jax.random.key(0)
    out = {}
    for precision in PRECISIONS:
        alg = make_algorithm("maml", _with_precision(w, precision), num_inner_steps)
        grads, metrics = jax.jit(alg.meta_grad)(w.params, w.episodes, key)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads)), precision
        out[precision] = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
        if precision == "fp32":
            inner_losses = [float(x) for x in metrics["inner_losses"]]
    with jax.enable_x64(True):
        alg = make_algorithm("maml", w, num_inner_steps)
        grads, _ = jax.jit(alg.meta_grad)(_to_float64(w.params), _to_float64(w.episodes), key)
        out["fp64"] = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    return out, inner_losses


def compare(g: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Relative L2 error and cosine similarity of ``g`` against ``ref``, overall and by rank."""

    def stats(pairs):
        a = np.concatenate([x.ravel() for x, _ in pairs])
        b = np.concatenate([y.ravel() for _, y in pairs])
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        return {"rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b)), "cosine": cos}

    pairs = list(zip(g, ref, strict=True))
    out = {"all": stats(pairs)}
    for name, keep in (("matrices", lambda x: x.ndim >= 2), ("vectors", lambda x: x.ndim < 2)):
        part = [(x, y) for x, y in pairs if keep(y)]
        if part:
            out[name] = stats(part)
    return out


def speed(w: Workload, num_inner_steps: int, seconds: float, rounds: int) -> dict:
    """tasks/s of the fp32 and bf16 steps, alternating rounds of ``seconds / rounds`` each."""
    key = jax.random.key(0)
    algs = {p: make_algorithm("maml", _with_precision(w, p), num_inner_steps) for p in PRECISIONS}
    steps = {p: jax.jit(a.step, donate_argnums=0) for p, a in algs.items()}
    totals = {p: [0, 0.0] for p in PRECISIONS}
    compile_s = {}
    for r in range(rounds + 1):
        for p in PRECISIONS:
            state = algs[p].init(w.params)
            n, t0 = 0, time.perf_counter()
            while n < (3 if r else 1) or (r and time.perf_counter() - t0 < seconds / rounds):
                state, metrics = steps[p](state, w.episodes, jax.random.fold_in(key, n))
                n += 1
                if n % 10 == 0:
                    jax.block_until_ready(metrics)
            jax.block_until_ready(metrics)
            if r:
                totals[p] = [totals[p][0] + n, totals[p][1] + time.perf_counter() - t0]
            else:
                compile_s[p] = time.perf_counter() - t0
    tasks = check_episodes(w.episodes)
    tps = {p: tasks * n / sec for p, (n, sec) in totals.items()}
    return {
        **{f"{p}_tasks_per_s": tps[p] for p in PRECISIONS},
        "bf16_speedup": tps["bf16"] / tps["fp32"],
        **{f"{p}_compile_s": compile_s[p] for p in PRECISIONS},
    }


MATMULS = {  # name -> (operand dtype, result dtype)
    "fp32": (jnp.float32, jnp.float32),
    "bf16 -> bf16": (jnp.bfloat16, jnp.bfloat16),
    "bf16 -> fp32": (jnp.bfloat16, jnp.float32),
}


def matmul_gflops(size: int = 1024, seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of one ``size x size`` matmul for each of ``MATMULS``."""
    out = {}
    for name, (dtype, result) in MATMULS.items():
        a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
        f = jax.jit(lambda x, result=result: jnp.matmul(x, x, preferred_element_type=result))
        rate = calls_per_second(lambda f=f, a=a: f(a).block_until_ready(), seconds)
        out[name] = 2 * size**3 * rate / 1e9
    return out


def markdown(result: dict) -> str:
    lines = [
        f"{result['date']}, {result['machine']}, jax {result['jax']}.",
        "",
        "1024 x 1024 matmul alone, GFLOP/s: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in result["matmul_gflops"].items())
        + ".",
        "",
        "| workload | inner steps | fp32 tasks/s | bf16 tasks/s | bf16 speed-up | "
        "support loss before each inner step (fp32) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        losses = ", ".join(f"{x:.3g}" for x in r["fp32_inner_losses"])
        lines.append(
            f"| {r['workload']} | {r['inner_steps']} | {r['fp32_tasks_per_s']:,.1f} | "
            f"{r['bf16_tasks_per_s']:,.1f} | {r['bf16_speedup']:.2f}x | {losses} |"
        )
    lines += [
        "",
        "Meta-gradient error (relative L2 error / cosine similarity against the reference; "
        "matrices: kernels and embeddings; vectors: biases and norm scales):",
        "",
        "| workload | inner steps | compared | all | matrices | vectors |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for name, acc in r["accuracy"].items():
            cells = [
                f"{acc[g]['rel_l2']:.2e} / {acc[g]['cosine']:.6f}" if g in acc else ""
                for g in ("all", "matrices", "vectors")
            ]
            lines.append(
                f"| {r['workload']} | {r['inner_steps']} | {name} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="sinusoid,encoder")
    p.add_argument("--inner-steps", default="1")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per precision")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    result = {**run_info(), "matmul_gflops": matmul_gflops(), "rows": []}
    print("1024 x 1024 matmul, GFLOP/s:", result["matmul_gflops"], flush=True)
    rows = result["rows"]
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")
        w = WORKLOADS[name]()
        for k in map(int, args.inner_steps.split(",")):
            g, inner_losses = meta_gradients(w, k)
            accuracy = {
                "bf16 vs fp64": compare(g["bf16"], g["fp64"]),
                "fp32 vs fp64": compare(g["fp32"], g["fp64"]),
                "bf16 vs fp32": compare(g["bf16"], g["fp32"]),
            }
            row = {"workload": name, "inner_steps": k, **speed(w, k, args.seconds, args.rounds)}
            row["accuracy"] = accuracy
            row["fp32_inner_losses"] = inner_losses
            rows.append(row)
            print(
                f"{name:9s} k={k}  fp32 {row['fp32_tasks_per_s']:10.1f}  bf16 "
                f"{row['bf16_tasks_per_s']:10.1f} tasks/s ({row['bf16_speedup']:.2f}x)  bf16 vs "
                f"fp64: rel L2 {accuracy['bf16 vs fp64']['all']['rel_l2']:.2e}, fp32 vs fp64: "
                f"{accuracy['fp32 vs fp64']['all']['rel_l2']:.2e}",
                flush=True,
            )
            report.write(args.out, "precision", result, markdown)  # after every row
    print(f"wrote {args.out}/precision.json and precision.md")


if __name__ == "__main__":
    main()
