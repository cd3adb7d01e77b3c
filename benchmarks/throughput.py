"""Steady-state meta-training throughput (tasks/s) of metaflax's algorithms.

    python -m benchmarks.throughput          # all workloads; writes benchmarks/results/
    python -m benchmarks.throughput --workloads sinusoid --min-seconds 1

For each workload x algorithm x inner steps it jit-compiles ``alg.step`` (compile time reported
separately), then times repeated steps on a fixed meta-batch until ``--min-seconds`` pass.
The conv4 section also compares formulations (pooling, task_map) of second-order MAML.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import report
from benchmarks.workloads import WORKLOADS, make_algorithm, run_info
from metaflax.core import check_episodes
from metaflax.models import Conv4, max_pool_2x2

ALGORITHMS = ("maml", "fomaml", "reptile", "meta_sgd", "mamlpp", "imaml", "learned_opt")
# The settings beyond the inner and outer optimizers: MAML++ timed in its costliest phase (the
# multi-step loss, second order), iMAML with 5 conjugate-gradient steps.
SETTINGS = {
    "mamlpp": dict(multi_step_loss=10**9, first_order_steps=0),
    "imaml": dict(lam=1.0, cg_steps=5),
}


def time_step(alg, workload, min_seconds: float, min_steps: int = 3) -> dict:
    """Compile time and steady-state tasks/s of ``jax.jit(alg.step)``."""
    step = jax.jit(alg.step, donate_argnums=0)
    state = alg.init(workload.params)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, workload.episodes, key).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, workload.episodes, key)  # warm-up
    jax.block_until_ready(metrics)
    steps, t0 = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - t0 < min_seconds:
        state, metrics = compiled(state, workload.episodes, jax.random.fold_in(key, steps))
        steps += 1
        if steps % 10 == 0:
            jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    tasks = check_episodes(workload.episodes)
    return {
        "compile_s": compile_s,
        "step_ms": 1e3 * seconds / steps,
        "tasks_per_s": tasks * steps / seconds,
        "steps_timed": steps,
    }


class _Conv4LaxConv(Conv4):
    """Conv4 with XLA's convolution (``nnx.Conv``) and the reshape max-pool."""

    def __call__(self, x):
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = max_pool_2x2(jax.nn.relu(norm(conv(x))))
        return self.head(x.reshape(x.shape[0], -1))


class _Conv4LaxConvReduceWindow(Conv4):
    """Conv4 as usually written: XLA's convolution and reduce_window max-pool."""

    def __call__(self, x):
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.max_pool(jax.nn.relu(norm(conv(x))), (2, 2), (2, 2), padding="VALID")
        return self.head(x.reshape(x.shape[0], -1))


FORMULATIONS = {
    "shift-matmul conv + reshape max-pool (metaflax)": Conv4,
    "lax.conv + reshape max-pool": _Conv4LaxConv,
    "lax.conv + reduce_window max-pool": _Conv4LaxConvReduceWindow,
}


def conv4_formulations(min_seconds: float, num_tasks: int) -> list[dict]:
    """Second-order MAML (1 inner step) on conv4: conv/pool formulation x task_map.

    Uses the first ``num_tasks`` tasks of the meta-batch: the lax.conv variants take over a
    minute per 32-task step on a 2-core CPU.
    """
    rows = []
    for label, cls in FORMULATIONS.items():
        w = WORKLOADS["conv4"](cls)
        w = w._replace(episodes=jax.tree.map(lambda x: x[:num_tasks], w.episodes))
        for task_map in ("vmap", "scan"):
            r = time_step(make_algorithm("maml", w, 1, task_map=task_map), w, min_seconds)
            rows.append({"formulation": label, "task_map": task_map, "tasks": num_tasks, **r})
            print(
                f"conv4 maml [{label}] task_map={task_map:4s} {r['tasks_per_s']:8.2f} tasks/s",
                flush=True,
            )
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 3.6))
    for ax, wl in zip(np.atleast_1d(axes), workloads, strict=True):
        sub = [r for r in rows if r["workload"] == wl]
        algs = list(dict.fromkeys(r["algorithm"] for r in sub))
        steps = sorted({r["inner_steps"] for r in sub})
        width = 0.8 / len(steps)
        for j, s in enumerate(steps):
            vals = [
                next(r["tasks_per_s"] for r in sub if r["algorithm"] == a and r["inner_steps"] == s)
                for a in algs
            ]
            ax.bar(np.arange(len(algs)) + j * width, vals, width, label=f"{s} inner step(s)")
        ax.set_xticks(np.arange(len(algs)) + width * (len(steps) - 1) / 2, algs)
        ax.set(title=wl, ylabel="meta-train tasks/s", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The tables of benchmarks/README.md, from a throughput.json result."""
    rows = result["throughput"]
    lines = [
        f"{result['date']}, {result['machine']}, jax {result['jax']}.",
        "",
        "| workload | algorithm | tasks/s, 1 inner step | tasks/s, 5 inner steps | compile s |",
        "|---|---|---|---|---|",
    ]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        for name in dict.fromkeys(r["algorithm"] for r in rows if r["workload"] == wl):
            by_k = {
                r["inner_steps"]: r for r in rows if (r["workload"], r["algorithm"]) == (wl, name)
            }
            cells = [f"{by_k[k]['tasks_per_s']:,.1f}" if k in by_k else "" for k in (1, 5)]
            comp = " / ".join(f"{by_k[k]['compile_s']:.1f}" for k in (1, 5) if k in by_k)
            lines.append(f"| {wl} | {name} | {cells[0]} | {cells[1]} | {comp} |")
    lines += ["", "Speed relative to second-order MAML at the same number of inner steps:", ""]
    lines += ["| workload | algorithm | x MAML, 1 step | x MAML, 5 steps |", "|---|---|---|---|"]
    tps = {(r["workload"], r["algorithm"], r["inner_steps"]): r["tasks_per_s"] for r in rows}
    for wl, name, k in tps:
        if k == 1 and name != "maml" and (wl, "maml", 1) in tps:
            ratios = [
                f"{tps[(wl, name, s)] / tps[(wl, 'maml', s)]:.2f}"
                if (wl, name, s) in tps and (wl, "maml", s) in tps
                else ""
                for s in (1, 5)
            ]
            lines.append(f"| {wl} | {name} | {ratios[0]} | {ratios[1]} |")
    if "conv4_formulations" in result:
        lines += [
            "",
            "| conv4 MAML formulation | task_map | tasks | tasks/s |",
            "|---|---|---|---|",
        ]
        for r in result["conv4_formulations"]:
            lines.append(
                f"| {r['formulation']} | {r['task_map']} | {r['tasks']} | {r['tasks_per_s']:.2f} |"
            )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="sinusoid,conv4,encoder")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--inner-steps", default="1,5")
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--no-formulations", action="store_true", help="skip the conv4 comparison")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    rows = []
    for wl in args.workloads.split(","):
        if wl not in WORKLOADS:
            raise SystemExit(f"unknown workload {wl!r}; valid: {', '.join(WORKLOADS)}")
        w = WORKLOADS[wl]()
        for name in args.algorithms.split(","):
            for k in map(int, args.inner_steps.split(",")):
                alg = make_algorithm(name, w, k, **SETTINGS.get(name, {}))
                r = time_step(alg, w, args.min_seconds)
                rows.append({"workload": wl, "algorithm": name, "inner_steps": k, **r})
                print(
                    f"{wl:9s} {name:9s} k={k}  {r['tasks_per_s']:10.1f} tasks/s  "
                    f"step {r['step_ms']:8.2f} ms  compile {r['compile_s']:5.1f} s",
                    flush=True,
                )
    result = {
        **run_info(),
        "throughput": rows,
    }
    if "conv4" in args.workloads and not args.no_formulations:
        result["conv4_formulations"] = conv4_formulations(args.min_seconds, num_tasks=4)
    report.write(args.out, "throughput", result, markdown)
    plot(rows, os.path.join(args.out, "throughput.png"))
    print(f"wrote {args.out}/throughput.json, throughput.md and throughput.png")


if __name__ == "__main__":
    main()
