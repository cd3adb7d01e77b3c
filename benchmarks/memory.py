"""Peak memory of a second-order MAML step vs the number of inner steps, with and without remat.

    python -m benchmarks.memory                      # encoder, 1-16 inner steps; writes results/
    python -m benchmarks.memory --inner-steps 1,2,4 --rss-max-gib 0   # XLA's numbers only

For each number of inner steps and each remat mode it compiles ``jax.jit(alg.step)`` for
``make_algorithm("maml", encoder(), k, remat=...)`` in a fresh subprocess and records XLA's
memory analysis of the compiled step: argument + output + temp bytes (``peak_memory_in_bytes``
is recorded too, but on XLA:CPU it counts arguments and outputs only). Deterministic: the same
program gets the same buffer assignment on every run and machine load does not matter.

As a cross-check it then runs the step once: on CPU the rise of the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before) over its resident set before the
step; on an accelerator ``memory_stats()['peak_bytes_in_use']`` of the device. Steps whose XLA
estimate exceeds ``--rss-max-gib`` are not run (second-order MAML without remat needs ~10 GiB at
16 inner steps). The remat modes: ``none``; ``per-step`` (``remat=True``: one checkpoint per
inner step); ``two-level`` (``remat=c`` with ``c = isqrt(k)``: checkpoints every ``c`` steps and
recomputes a segment at a time; for ``k < 4`` it is the per-step mode and is not run again);
``imaml``: not MAML but ``mf.imaml`` (``lam=1``, 5 conjugate-gradient steps), whose implicit
meta-gradient keeps nothing of the inner loop (its tasks/s: :mod:`benchmarks.throughput`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import report

MODES = ("none", "per-step", "two-level", "imaml")


def _remat_arg(mode: str, k: int) -> bool | int | None:
    return {"none": False, "per-step": True, "two-level": math.isqrt(k), "imaml": None}[mode]


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(workload: str, k: int, mode: str, rss_max_gib: float) -> dict:
    """Compiles (and maybe runs) one MAML step; call in a fresh process for the RSS numbers."""
    import jax

    from benchmarks.workloads import WORKLOADS, make_algorithm

    w = WORKLOADS[workload]()
    if mode == "imaml":
        alg = make_algorithm("imaml", w, k, lam=1.0, cg_steps=5)
    else:
        alg = make_algorithm("maml", w, k, remat=_remat_arg(mode, k))
    state, key = alg.init(w.params), jax.random.key(0)
    t0 = time.perf_counter()
    compiled = jax.jit(alg.step).lower(state, w.episodes, key).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    row = {
        "workload": workload,
        "inner_steps": k,
        "remat": mode,
        "remat_arg": _remat_arg(mode, k),
        "compile_s": compile_s,
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "xla_peak_memory_in_bytes": getattr(m, "peak_memory_in_bytes", None),
    }
    row["xla_bytes"] = (
        row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    )
    row["measured_bytes"] = row["step_s"] = None
    if row["xla_bytes"] > rss_max_gib * 2**30:
        return row
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    jax.block_until_ready((state, w.episodes))
    if on_cpu:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _proc_kib("VmRSS")
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, w.episodes, key))
    row["step_s"] = time.perf_counter() - t0
    if on_cpu:
        row["measured_bytes"] = (_proc_kib("VmHWM") - before) * 1024
        row["measured_what"] = "CPU: rise of the process's peak RSS (VmHWM) during the step"
    else:
        row["measured_bytes"] = device.memory_stats()["peak_bytes_in_use"]
        row["measured_what"] = f"{device.platform}: memory_stats()['peak_bytes_in_use']"
    return row


def params_carry_bytes(workload: str) -> dict:
    """Bytes of one copy of the params, and of the per-task copies the inner loop carries."""
    import jax

    from benchmarks.workloads import WORKLOADS
    from metaflax.core import check_episodes

    w = WORKLOADS[workload]()
    one = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(w.params))
    return {"params_bytes": one, "tasks": check_episodes(w.episodes)}


def _run_worker(workload, k, mode, rss_max_gib) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", workload, str(k), mode]
    cmd += ["--rss-max-gib", str(rss_max_gib)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:,.0f}"


def _curves(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """mode -> inner steps -> row; two-level borrows the per-step rows where it is the same."""
    curves = {m: {r["inner_steps"]: r for r in rows if r["remat"] == m} for m in MODES}
    for k, r in curves["per-step"].items():
        if math.isqrt(k) < 2:
            curves["two-level"].setdefault(k, r)
    return {m: dict(sorted(c.items())) for m, c in curves.items() if c}


def markdown(result: dict) -> str:
    curves = _curves(result["rows"])
    steps = sorted({k for c in curves.values() for k in c})
    carry = result["params_bytes"] * result["tasks"]
    lines = [
        f"{result['date']}, {result['machine']}, jax {result['jax']}; workload "
        f"`{result['workload']}` ({result['tasks']} tasks, {result['params_bytes'] / 2**20:.1f} "
        f"MiB of params: the per-task params the inner loop carries are {carry / 2**20:.1f} MiB "
        "per step).",
        "",
        "XLA's compiled memory analysis (argument + output + temp), MiB, and the ratio to 1 inner "
        "step:",
        "",
        "| remat | " + " | ".join(f"{k} step{'s' * (k > 1)}" for k in steps) + " | x, 1 -> "
        f"{steps[-1]} |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for mode, c in curves.items():
        cells = [_mib(c[k]["xla_bytes"]) if k in c else "" for k in steps]
        first, last = c.get(steps[0]), c.get(steps[-1])
        ratio = f"{last['xla_bytes'] / first['xla_bytes']:.2f}" if first and last else ""
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {ratio} |")
    lines += [
        "",
        "Measured during one step (" + result["measured_what"] + "), MiB; "
        "empty: not run (XLA estimate above --rss-max-gib). Step seconds in brackets:",
        "",
        "| remat | " + " | ".join(f"{k}" for k in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for mode, c in curves.items():
        cells = []
        for k in steps:
            r = c.get(k)
            if r is None or r["measured_bytes"] is None:
                cells.append("")
            else:
                cells.append(f"{_mib(r['measured_bytes'])} ({r['step_s']:.1f} s)")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    curves = _curves(result["rows"])
    labels = {
        "none": "no remat",
        "per-step": "remat=True (per step)",
        "two-level": "remat=isqrt(k) (two-level)",
        "imaml": "iMAML (implicit, 5 CG steps)",
    }
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, c in curves.items():
        ks = np.array(list(c))
        mib = np.array([r["xla_bytes"] for r in c.values()]) / 2**20
        ax0.plot(ks, mib, "o-", label=labels[mode])
        ax1.plot(ks, mib / mib[0], "o-", label=labels[mode])
    ax1.axhline(1.2, color="gray", ls="--", lw=1, label="1.2x target")
    steps = sorted({k for c in curves.values() for k in c})
    for ax in (ax0, ax1):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(steps, [str(k) for k in steps])
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("inner steps")
        ax.legend(fontsize=8)
    ax0.set(ylabel="MiB (XLA: argument + output + temp)", title=f"{result['workload']} MAML step")
    ax1.set(ylabel="x memory at 1 inner step", title="growth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="encoder")
    p.add_argument("--inner-steps", default="1,2,4,8,16")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rss-max-gib", type=float, default=3.0, help="run steps below this only")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "K", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        workload, k, mode = args.worker
        print(json.dumps(measure(workload, int(k), mode, args.rss_max_gib)))
        return

    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown remat mode {mode!r}; valid: {', '.join(MODES)}")
        for k in map(int, args.inner_steps.split(",")):
            if mode == "two-level" and math.isqrt(k) < 2:
                continue  # remat=1 is remat=True
            r = _run_worker(args.workload, k, mode, args.rss_max_gib)
            rows.append(r)
            print(
                f"{mode:9s} k={k:2d}  XLA {_mib(r['xla_bytes']):>7s} MiB (temp "
                f"{_mib(r['temp_bytes'])})  measured {_mib(r['measured_bytes']) or '-':>7s} MiB  "
                f"compile {r['compile_s']:5.1f} s",
                flush=True,
            )
    from benchmarks.workloads import run_info

    result = {
        **run_info(),
        "workload": args.workload,
        **params_carry_bytes(args.workload),
        "measured_what": next(
            (r["measured_what"] for r in rows if r.get("measured_what")), "not measured"
        ),
        "rows": rows,
    }
    report.write(args.out, "memory", result, markdown)
    plot(result, os.path.join(args.out, "memory.png"))
    print(f"wrote {args.out}/memory.json, memory.md and memory.png")


if __name__ == "__main__":
    main()
