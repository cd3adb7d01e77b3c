"""Meta-trains the sinusoid regressor with several algorithms and evaluates few-shot MSE.

Writes ``results.json``, ``results.md`` and ``sinusoid.png`` to ``--workdir`` and prints a table
of mean MSE +- 95% CI on fresh tasks for each algorithm, number of shots and inner steps.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

import metaflax as mf
from experiments.configs.common import algorithm_kwargs, with_fields
from metaflax.models import MLP
from metaflax.tasks import mse_loss_fn, sample_sinusoid


def make_algorithm(name: str, loss_fn, config: ml_collections.ConfigDict) -> mf.MetaAlgorithm:
    """The algorithm ``name`` with the config's inner SGD (clipped at ``inner_clip``) and outer
    Adam (cosine-decayed if ``outer_lr_decay``)."""
    outer_lr = config.outer_lr
    if config.outer_lr_decay:
        outer_lr = optax.cosine_decay_schedule(config.outer_lr, config.num_steps)
    return mf.make_algorithm(
        name,
        loss_fn,
        outer_tx=optax.adam(outer_lr),
        inner_lr=config.inner_lr,
        num_inner_steps=config.num_inner_steps,
        inner_transform=optax.clip_by_global_norm(config.inner_clip) if config.inner_clip else None,
        **algorithm_kwargs(name, config),
    )


def _algorithm_config(config, name):
    return with_fields(config, **config.overrides.to_dict().get(name, {}))


def meta_train(alg: mf.MetaAlgorithm, params, config, key, desc: str):
    """Runs ``config.num_steps`` meta-steps, sampling tasks on device, in jitted chunks."""

    @jax.jit
    def chunk(state, chunk_key):
        def body(state, step_key):
            task_key, alg_key = jax.random.split(step_key)
            episodes, _ = sample_sinusoid(
                task_key, config.meta_batch_size, config.num_support, config.num_query
            )
            return alg.step(state, episodes, alg_key)

        return jax.lax.scan(body, state, jax.random.split(chunk_key, config.steps_per_chunk))

    state = alg.init(params)
    curve = []
    num_chunks = -(-config.num_steps // config.steps_per_chunk)
    with tqdm(total=num_chunks * config.steps_per_chunk, desc=desc, unit="step") as bar:
        start = time.perf_counter()
        for i in range(num_chunks):
            state, metrics = chunk(state, jax.random.fold_in(key, i))
            mf.check_finite(metrics)
            loss = float(jnp.mean(metrics["loss"]))
            curve.append((int(state.step), loss))
            bar.update(config.steps_per_chunk)
            bar.set_postfix(loss=f"{loss:.3f}")
    return state, curve, time.perf_counter() - start


def evaluate(alg, meta_params, loss_fn, config, shots: int, steps: int) -> np.ndarray:
    """Query MSE on ``config.eval.num_tasks`` fresh tasks after ``steps`` inner steps."""

    @jax.jit
    def run(key):
        episodes, _ = sample_sinusoid(key, config.eval.num_tasks, shots, config.eval.num_query)

        def one(episode, k):
            adapted, _ = alg.adapt(meta_params, episode.support, k, num_steps=steps)
            return loss_fn(adapted, episode.query, k)[0]

        return jax.vmap(one)(episodes, jax.random.split(key, config.eval.num_tasks))

    # The same tasks for every algorithm: the key depends on shots only.
    return np.asarray(run(jax.random.fold_in(jax.random.key(config.eval.seed), shots)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Meta-trains every configured algorithm, evaluates it, and writes the outputs."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    sizes = [1, *config.hidden, 1]
    apply_fn, params = mf.functionalize(MLP(sizes, rngs=nnx.Rngs(config.seed)))
    loss_fn = mse_loss_fn(apply_fn)

    results = {"algorithms": {}, "config": config.to_dict()}
    fits = {}
    for name in config.algorithms:
        cfg = _algorithm_config(config, name)
        alg = make_algorithm(name, loss_fn, cfg)
        key = jax.random.fold_in(jax.random.key(config.seed), len(name))
        state, curve, seconds = meta_train(alg, params, cfg, key, desc=name)
        entry = {"train_seconds": seconds, "train_curve": curve, "mse": {}}
        steps_set = sorted(set(config.eval.inner_steps) | set(config.eval.curve_steps))
        for shots in config.eval.shots:
            for steps in steps_set:
                mse = evaluate(alg, state.meta_params, loss_fn, config, shots, steps)
                mean, ci = mf.mean_ci95(mse)
                entry["mse"][f"{shots}-shot/{steps}-step"] = {"mean": mean, "ci95": ci}
        results["algorithms"][name] = entry
        fits[name] = _example_fit(alg, state.meta_params, apply_fn, config)

    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = results_table(results, config)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    _plot(results, fits, config, os.path.join(workdir, "sinusoid.png"))
    print(table)
    print(f"\nwrote results.json, results.md and sinusoid.png to {workdir}")
    return results


def results_table(results: dict, config) -> str:
    """A markdown table: rows are algorithms, columns K-shot / inner steps."""
    cols = [(k, s) for s in config.eval.inner_steps for k in config.eval.shots]
    head = "| algorithm | " + " | ".join(f"{k}-shot, {s} step{'s' * (s > 1)}" for k, s in cols)
    lines = [head + " |", "|---" * (len(cols) + 1) + "|"]
    for name, entry in results["algorithms"].items():
        cells = []
        for k, s in cols:
            m = entry["mse"][f"{k}-shot/{s}-step"]
            cells.append(f"{m['mean']:.3f} ± {m['ci95']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _example_fit(alg, meta_params, apply_fn, config):
    key = jax.random.key(config.eval.seed + 1)
    episodes, task = sample_sinusoid(key, 1, 10, 0)
    support = jax.tree.map(lambda x: x[0], episodes.support)
    xs = jnp.linspace(-5, 5, 200)[:, None]
    out = {"x": np.asarray(xs[:, 0]), "support": support, "task": task}
    for steps in config.eval.inner_steps:
        adapted, _ = alg.adapt(meta_params, support, key, num_steps=steps)
        out[steps] = np.asarray(apply_fn(adapted, xs)[:, 0])
    return out


def _plot(results, fits, config, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["algorithms"])
    cols = 3
    rows = -(-(1 + len(names)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[1 + len(names) :]:
        ax.axis("off")
    steps_set = sorted(set(config.eval.inner_steps) | set(config.eval.curve_steps))
    k = config.eval.shots[len(config.eval.shots) // 2]
    for name in names:
        mse = results["algorithms"][name]["mse"]
        means = [mse[f"{k}-shot/{s}-step"]["mean"] for s in steps_set]
        axes[0].plot(steps_set, means, marker="o", label=name)
    axes[0].set(xlabel="inner steps at test", ylabel=f"{k}-shot query MSE", yscale="log")
    axes[0].legend()
    for ax, name in zip(axes[1 : 1 + len(names)], names, strict=True):
        fit = fits[name]
        amp, phase = fit["task"]["amplitude"][0], fit["task"]["phase"][0]
        ax.plot(fit["x"], amp * np.sin(fit["x"] - phase), "k", label="true")
        for steps in config.eval.inner_steps:
            ax.plot(fit["x"], fit[steps], label=f"{steps} step{'s' * (steps > 1)}")
        ax.scatter(fit["support"]["x"][:, 0], fit["support"]["y"][:, 0], c="k", s=12)
        ax.set(title=f"{name}, 10-shot", ylim=(-6, 6))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flags():
    """``(config, workdir)`` flags, defined only when run as a script (so that importing
    several experiment modules, as the tests do, never defines a flag twice)."""
    config = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "sinusoid.py")
    )
    workdir = flags.DEFINE_string("workdir", "workdirs/sinusoid", "Where outputs are written.")
    return config, workdir


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    config_flag, workdir_flag = _flags()
    app.run(lambda argv: main(config_flag.value, workdir_flag.value))
