"""Meta-training throughput vs number of devices and meta-batch size, MAML vs Reptile.

    python -m benchmarks.scaling                 # writes benchmarks/results/scaling.{json,png}

Runs the task-sharded step of :mod:`metaflax.sharding` (``mode="jit"``) on meshes of 1, 2, 4, ...
devices. On a CPU-only machine it fakes 8 CPU devices that share the same cores: the numbers then
only prove the code path (more devices cannot be faster there); on GPUs/TPUs they measure scaling.
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from benchmarks import report

if not os.environ.get("JAX_PLATFORMS") or "cpu" in os.environ["JAX_PLATFORMS"]:
    jax.config.update("jax_num_cpu_devices", 8)  # only affects the CPU backend

import jax.numpy as jnp

from benchmarks.workloads import WORKLOADS, make_algorithm
from metaflax import sharding
from metaflax.core import check_episodes


def _tile_tasks(episodes, num_tasks):
    reps = -(-num_tasks // check_episodes(episodes))
    return jax.tree.map(lambda x: jnp.concatenate([x] * reps)[:num_tasks], episodes)


def measure(workload, name, devices, meta_batch, min_seconds):
    w = WORKLOADS[workload]()
    episodes = _tile_tasks(w.episodes, meta_batch)
    alg = make_algorithm(name, w, 1)
    mesh = sharding.make_mesh(tasks=devices)
    learner = sharding.shard(alg, mesh, w.params)
    # Each process builds only its share of the tasks (all of them on a single host).
    local = jax.tree.map(lambda x: x[sharding.local_task_slice(meta_batch)], episodes)
    state, episodes = learner.init(w.params), sharding.global_batch(local, mesh)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    state, metrics = learner.step(state, episodes, key)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < min_seconds:
        state, metrics = learner.step(state, episodes, jax.random.fold_in(key, steps))
        jax.block_until_ready(metrics["loss"])  # fake CPU devices: never run ahead (rendezvous)
        steps += 1
    seconds = time.perf_counter() - t0
    return {
        "workload": workload,
        "algorithm": name,
        "devices": devices,
        "meta_batch": meta_batch,
        "tasks_per_s": meta_batch * steps / seconds,
        "compile_s": compile_s,
    }


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key in sorted({(r["workload"], r["algorithm"], r["meta_batch"]) for r in rows}):
        sub = [r for r in rows if (r["workload"], r["algorithm"], r["meta_batch"]) == key]
        ax.plot(
            [r["devices"] for r in sub],
            [r["tasks_per_s"] for r in sub],
            marker="o",
            label=f"{key[0]} {key[1]} batch {key[2]}",
        )
    ax.set(
        xlabel="devices on the 'tasks' axis",
        ylabel="meta-train tasks/s",
        xscale="log",
        yscale="log",
        title=f"scaling on {jax.devices()[0].platform}",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    sharding.initialize_distributed()  # multi-host when METAFLAX_DISTRIBUTED=1 (run_tpu.sh)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="sinusoid,encoder")
    p.add_argument("--meta-batches", default="8,32")
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    counts = [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256) if d <= jax.device_count()]
    if jax.process_count() > 1:  # sub-meshes would leave hosts out: use every device
        counts = [jax.device_count()]
    rows = []
    for workload in args.workloads.split(","):
        for name in ("maml", "reptile"):
            for mb in map(int, args.meta_batches.split(",")):
                for d in (d for d in counts if mb % d == 0):
                    r = measure(workload, name, d, mb, args.min_seconds)
                    rows.append(r)
                    if sharding.is_main_process():
                        print(
                            f"{workload:9s} {name:8s} batch {mb:3d} devices {d:2d} "
                            f"{r['tasks_per_s']:10.1f} tasks/s",
                            flush=True,
                        )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "rows": rows,
    }
    if not sharding.is_main_process():
        return
    report.write(args.out, "scaling", result)
    plot(rows, os.path.join(args.out, "scaling.png"))
    print(f"wrote {args.out}/scaling.json and scaling.png")


if __name__ == "__main__":
    main()
