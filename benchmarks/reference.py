"""Library overhead: metaflax's meta-step vs a minimal hand-written jax+optax step.

    python -m benchmarks.reference                         # all workloads, 1 inner step
    python -m benchmarks.reference --workloads sinusoid --inner-steps 1,5

The hand-written steps (:func:`metaflax.testing.reference_step`) are what a user would write
without metaflax: a Python loop of ``jax.grad`` + SGD per task, ``vmap`` over tasks,
``optax.adam`` outside. They compute the same
numbers as ``mf.maml`` / ``mf.reptile`` (tested in ``tests/test_benchmarks.py``). Both are timed
in the same process, in alternating rounds, and reported as a ratio (metaflax / reference time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from benchmarks.workloads import WORKLOADS, Workload, make_algorithm
from metaflax.testing import KINDS, reference_step


def _rate(step, carry, episodes, key, seconds: float) -> tuple[int, float]:
    """``(steps, seconds)`` of ``carry = step(*carry, episodes, key)[:-1]`` for ``seconds``."""
    steps, t0, out = 0, time.perf_counter(), None
    while steps < 3 or time.perf_counter() - t0 < seconds:
        out = step(*carry, episodes, key)
        carry = out[:-1]
        steps += 1
        if steps % 10 == 0:
            jax.block_until_ready(out[-1])
    jax.block_until_ready(out)
    return steps, time.perf_counter() - t0


def compare(kind: str, w: Workload, num_inner_steps: int, seconds: float, rounds: int) -> dict:
    """Steps/s of metaflax's jitted step and the hand-written one, in alternating rounds (the
    first round compiles and warms up and is not counted)."""
    alg = make_algorithm(kind, w, num_inner_steps)
    mf_step = jax.jit(alg.step, donate_argnums=0)
    ref, outer = reference_step(kind, w.loss_fn, w.inner_lr, w.outer_lr, num_inner_steps)
    ref_step = jax.jit(ref, donate_argnums=(0, 1))
    key = jax.random.key(0)
    totals = {"metaflax": [0, 0.0], "reference": [0, 0.0]}
    for r in range(rounds + 1):
        params = jax.tree.map(jnp.array, w.params)
        runs = {
            "metaflax": (mf_step, (alg.init(w.params),)),
            "reference": (ref_step, (params, outer.init(params))),
        }
        for name, (step, carry) in runs.items():
            n, sec = _rate(step, carry, w.episodes, key, seconds / rounds if r else 0.0)
            if r:
                totals[name] = [totals[name][0] + n, totals[name][1] + sec]
    mf_rate, ref_rate = (n / sec for n, sec in totals.values())
    return {
        "metaflax_steps_per_s": mf_rate,
        "reference_steps_per_s": ref_rate,
        "time_ratio": ref_rate / mf_rate,  # metaflax time per step / reference time per step
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="sinusoid,conv4,encoder")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--inner-steps", default="1")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/reference.json")
    args = parser.parse_args()
    rows = []
    for name in args.workloads.split(","):
        w = WORKLOADS[name]()
        for kind in args.kinds.split(","):
            for k in map(int, args.inner_steps.split(",")):
                r = {"workload": name, "algorithm": kind, "inner_steps": k}
                r.update(compare(kind, w, k, args.seconds, args.rounds))
                rows.append(r)
                print(
                    f"{name:9s} {kind:8s} {k:2d} steps: metaflax {r['metaflax_steps_per_s']:9.1f}"
                    f" steps/s, hand-written {r['reference_steps_per_s']:9.1f} steps/s, "
                    f"time ratio {r['time_ratio']:.3f}",
                    flush=True,
                )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        meta = {"machine": platform.processor() or platform.machine(), "jax": jax.__version__}
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
