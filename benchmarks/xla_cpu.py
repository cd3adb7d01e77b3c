"""Where XLA:CPU spends a meta-step, and what its flags change.

    python -m benchmarks.xla_cpu --workload encoder            # profile + flag sweep, ~6 min
    python -m benchmarks.xla_cpu --workload encoder --no-sweep # profile only

Profile: the jitted second-order MAML step (1 inner step), traced with ``jax.profiler`` and
XLA's per-thunk trace events; op time per category (dots, transposing / layout
copies, other fusions) and the largest ops. Sweep: the same step's tasks/s in a fresh process
per ``XLA_FLAGS`` value (flags are read once, at backend start). Writes ``xla_cpu.json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import report

FLAGS = (
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_experimental_ynn_fusion_type=",  # no YNNPACK: Eigen dots
)


def _step(workload: str, task_map: str):
    import jax

    from benchmarks.workloads import WORKLOADS, make_algorithm

    w = WORKLOADS[workload]()
    alg = make_algorithm("maml", w, 1, task_map=task_map)
    step = jax.jit(alg.step)
    state, key = alg.init(w.params), jax.random.key(0)
    return step, state, w.episodes, key


def rate(workload: str, task_map: str, seconds: float) -> float:
    """Tasks/s of the jitted step (after one compile-and-run call)."""
    import jax

    step, state, episodes, key = _step(workload, task_map)
    jax.block_until_ready(step(state, episodes, key))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        state, _ = step(state, episodes, key)
        jax.block_until_ready(state)
        n += 1
    return n * jax.tree.leaves(episodes)[0].shape[0] / (time.perf_counter() - start)


def _category(name: str) -> str:
    if name.startswith(("ynn", "dot")):
        return "dots"
    if "transpose" in name or "copy" in name:
        return "transposes / copies"
    return "other fusions"


def profile(workload: str, task_map: str, steps: int = 3) -> dict:
    """Milliseconds per step by op category, and the ten largest ops."""
    import jax

    step, state, episodes, key = _step(workload, task_map)
    for _ in range(2):
        state, _ = jax.block_until_ready(step(state, episodes, key))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        start = time.perf_counter()
        for _ in range(steps):
            state, _ = jax.block_until_ready(step(state, episodes, key))
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    hlo = step.lower(state, episodes, key).compile().as_text()
    instructions = set(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", hlo, re.MULTILINE))
    ops = collections.Counter()
    for e in events:  # the compiled program's instructions only, not runtime or Python events
        if e.get("ph") == "X" and e.get("name") in instructions:
            ops[e["name"]] += e["dur"] / 1e3 / steps
    by = collections.Counter()
    for name, ms in ops.items():
        by[_category(name)] += ms
    return {
        "wall_ms_per_step": 1e3 * wall,
        "op_ms_per_step": {k: round(v, 3) for k, v in by.most_common()},
        "largest_ops_ms": {k: round(v, 3) for k, v in ops.most_common(10)},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="encoder")
    parser.add_argument("--task-map", default="vmap")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--rate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.rate_only:  # one sweep point, in the process whose XLA_FLAGS are set
        print(rate(args.workload, args.task_map, args.seconds))
        return
    if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
        env = {**os.environ, "XLA_FLAGS": flags.strip()}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.xla_cpu", *sys.argv[1:]], env)
    out = {"workload": args.workload, "task_map": args.task_map}
    out["profile"] = profile(args.workload, args.task_map)
    print(json.dumps(out["profile"], indent=1), flush=True)
    if not args.no_sweep:
        out["sweep_tasks_per_s"] = {}
        for flags in FLAGS:
            cmd = [sys.executable, "-m", "benchmarks.xla_cpu", "--rate-only"]
            cmd += ["--workload", args.workload, "--task-map", args.task_map]
            cmd += ["--seconds", str(args.seconds)]
            env = {**os.environ, "XLA_FLAGS": flags}
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            out["sweep_tasks_per_s"][flags or "(defaults)"] = round(float(result.stdout), 2)
            print(f"{flags or '(defaults)'}: {float(result.stdout):.2f} tasks/s", flush=True)
    report.write(args.out, "xla_cpu", out)


if __name__ == "__main__":
    main()
