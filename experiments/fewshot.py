"""The meta-pretraining trainer: meta-train on many tasks, adapt few-shot to held-out ones.

One trainer for every task family of :mod:`experiments.families` (classification: CLDR language
identification, CLINC150, HuffPost, FewRel, optionally meta-trained on self-supervised SMLMT
tasks; extractive QA: XQuAD; translation: CLDR terms, Tatoeba; and a mixed run of several
families on one shared encoder). Methods: MAML, FOMAML, Reptile, Meta-SGD, LSLR, ANIL,
ProtoNet, and non-meta baselines with the same model and data: multi-task pretraining,
no pretraining (``scratch``) and a no-learning n-gram nearest-centroid floor. Every method is
evaluated on the same held-out episodes after 0..n adaptation steps; mean +- 95% CI.

    python -m experiments.fewshot                                   # configs/cldr.py
    python -m experiments.fewshot --config experiments/configs/clinc150.py:runlocal

Writes ``results.json``, ``results.md``, PNG plots, TensorBoard event files (``tb/<method>``)
and ``config.json`` to the workdir (default ``workdirs/<config.name>``). Rerunning the same
command resumes from the latest good orbax checkpoint (``checkpoints/<method>``); finished
methods are not retrained.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

import metaflax as mf
from experiments.configs.common import with_fields
from experiments.families import (
    CLASSIFICATION,
    DATASETS,
    Family,
    fine_tune_adapt,
    make_family,
    mixed_families,
)
from metaflax.algorithms import guarded_update
from metaflax.data import text_sources

META_METHODS = ("maml", "fomaml", "reptile", "meta_sgd", "lslr", "anil", "protonet")
BASELINES = ("multitask", "scratch", "ngram_centroid", "idf_centroid")
CENTROIDS = ("ngram_centroid", "idf_centroid")  # no learning, no adaptation
FINE_TUNED = ("protonet", "multitask", "scratch")  # adapted at test by plain SGD fine-tuning
METHODS = META_METHODS + BASELINES


def _num_devices(config) -> int:
    available = jax.device_count()
    n = config.num_devices or available
    if n > available:
        raise ValueError(f"num_devices={n} but only {available} devices exist; lower it.")
    return n


def check_config(config) -> None:
    """Fails early, naming the fix, on settings that cannot work (before loading any data)."""
    bad = [m for m in config.methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}.")
    if config.dataset not in (*DATASETS, "mixed"):
        valid = ", ".join((*DATASETS, "mixed"))
        raise ValueError(f"unknown dataset {config.dataset!r}; valid: {valid}.")
    classifiers = {"protonet", "anil", *CENTROIDS} & set(config.methods)
    if config.dataset not in CLASSIFICATION and classifiers:  # mixed runs too
        raise ValueError(
            f"{sorted(classifiers)} need a classification dataset ({', '.join(CLASSIFICATION)}); "
            f"drop them for {config.dataset!r}."
        )
    if "idf_centroid" in config.methods and config.ngram != 1:
        raise ValueError(
            f"idf_centroid weights single tokens: it needs ngram=1, not {config.ngram} "
            "(word-piece datasets); drop it or use ngram_centroid."
        )
    if config.model.pool not in ("cls", "mean", "mean+bow"):
        raise ValueError(f"model.pool={config.model.pool!r}; valid: 'cls', 'mean', 'mean+bow'.")
    if config.model.pool == "mean+bow" and config.dataset not in CLASSIFICATION:
        raise ValueError(
            "model.pool='mean+bow' needs a single classification dataset (its IDF comes from "
            "the meta-training text); use pool='mean' for QA, translation and mixed runs."
        )
    if config.meta_train_on == "smlmt" and "multitask" in config.methods:
        raise ValueError(
            "'multitask' needs labeled meta-training classes (meta_train_on='classes')."
        )
    devices = _num_devices(config)
    if config.meta_batch_size % devices:
        raise ValueError(
            f"meta_batch_size={config.meta_batch_size} must be divisible by num_devices="
            f"{devices} (tasks are split evenly across devices); change either."
        )
    if config.tokenizer == "hf" and not config.model.hf_path:
        raise ValueError(
            "tokenizer='hf' uses the tokenizer of an HF model directory: pass "
            "--config.model.hf_path=/path/to/bert (config.json, model.safetensors, vocab)."
        )


# ----------------------------------------------------------------------------------------------
# Methods.


def _method_config(config, method):
    return with_fields(config, **config.overrides.to_dict().get(method, {}))


def _outer_tx(cfg):
    lr = optax.warmup_cosine_decay_schedule(
        0.0, cfg.outer_lr, min(cfg.warmup_steps, cfg.num_steps // 2 + 1), max(cfg.num_steps, 2)
    )
    return optax.chain(optax.clip_by_global_norm(cfg.outer_clip), optax.adam(lr))


def make_algorithm(method: str, loss_fn, task_init, cfg) -> mf.MetaAlgorithm:
    """The meta-learning algorithm of ``method`` (not the baselines), from its config."""
    inner = optax.sgd(cfg.inner_lr)
    common = dict(outer_tx=_outer_tx(cfg), task_init=task_init)
    steps = cfg.num_inner_steps
    if method in ("maml", "fomaml"):
        return mf.maml(
            loss_fn, inner_tx=inner, num_inner_steps=steps, first_order=method == "fomaml", **common
        )
    if method == "anil":
        return mf.maml(
            loss_fn,
            inner_tx=inner,
            num_inner_steps=steps,
            adapt_mask=mf.path_filter("head"),
            **common,
        )
    if method == "reptile":
        return mf.reptile(loss_fn, inner_tx=inner, num_inner_steps=steps, **common)
    if method in ("meta_sgd", "lslr"):
        factory = mf.meta_sgd if method == "meta_sgd" else mf.lslr
        return factory(loss_fn, init_lr=cfg.inner_lr, num_inner_steps=steps, **common)
    if method == "protonet":
        return mf.protonet(loss_fn, **common)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}.")


def _base_params(method: str, meta_params):
    """The model parameters inside the meta-parameters (Meta-SGD/LSLR also hold inner LRs)."""
    return meta_params["params"] if method in ("meta_sgd", "lslr") else meta_params


# ----------------------------------------------------------------------------------------------
# Checkpoints: orbax, async, validated on restore.


def _manager(directory: str, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
    )


def _save(mngr, step: int, state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )


def restore_latest(directory: str, abstract_state, keep: int):
    """``(mngr, state, meta)`` from the newest checkpoint that restores and is finite.

    A corrupted or half-written step is reported and moved aside to ``<directory>.corrupt/``
    (nothing is deleted), and the previous step is tried. ``state`` is None when there is none.
    """
    import orbax.checkpoint as ocp

    mngr = _manager(directory, keep)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
            state, meta = restored["state"], restored["meta"]
            leaves = jax.tree.leaves(state)
            if (
                meta is None
                or meta.get("step") != step
                or not all(
                    np.isfinite(np.asarray(x)).all()
                    for x in leaves
                    if jnp.issubdtype(x.dtype, jnp.floating)
                )
            ):
                raise ValueError("metadata missing or mismatched, or non-finite parameters")
            return mngr, state, meta
        except Exception as e:  # orbax raises assorted errors for damaged steps
            aside = os.path.join(directory + ".corrupt", f"{step}-{int(time.time())}")
            print(
                f"checkpoint step {step} in {directory} is unreadable ({type(e).__name__}: "
                f"{str(e)[:200]}); moved to {aside}, trying the previous one.",
                file=sys.stderr,
            )
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(directory, str(step)), aside)
            mngr.close()
            mngr = _manager(directory, keep)
    return mngr, None, None


# ----------------------------------------------------------------------------------------------
# Training.


def _multitask_step(loss_fn, tx):
    """One plain (non-meta) training step on pooled examples, NaN-guarded like ``alg.step``."""
    update = guarded_update(tx)

    def step(state, batch, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.meta_params, batch, key
        )
        metrics = {"loss": loss, **{f"query_{k}": v for k, v in metrics.items()}}
        return update(state, grads, metrics)

    return step


def merged_params(families: dict[str, Family], multitask: bool = False):
    """One parameter tree for all families: the shared encoder and every family's head."""
    out = {}
    for family in families.values():
        params = family.multitask_params if multitask else family.params
        out = {**out, **params} if isinstance(params, dict) and "encoder" in params else params
    return out


def train_method(method: str, cfg, families: dict[str, Family], workdir: str):
    """Meta-trains (or pretrains) one method, resuming from its latest good checkpoint.

    Several families (a mixed run) take turns, one meta-batch (or pooled batch) per step, on
    one shared parameter tree. Returns ``(params, curve, seconds)`` with ``params`` ready for
    test-time adaptation; ``scratch`` returns the initial parameters untrained.
    """
    names = list(families)
    if method in ("scratch", *CENTROIDS):  # nothing to train
        return merged_params(families), [], 0.0
    steps, batches = {}, {}
    if method == "multitask":
        params, tx = merged_params(families, multitask=True), _outer_tx(cfg)

        def init(p):  # a copy: the jitted step donates the state
            p = jax.tree.map(jnp.array, p)
            return mf.MetaState(p, tx.init(p), jnp.zeros((), jnp.int32))

        for name, family in families.items():
            steps[name] = jax.jit(_multitask_step(family.loss_fn, tx), donate_argnums=0)
            batches[name] = lambda step, f=family: f.multitask_batch(cfg.seed, step)
        unit = "ex"
        per_step = np.mean([f.examples_per_step for f in families.values()])
    else:
        params = merged_params(families)
        for name, family in families.items():
            # ProtoNet's classifier is always the prototype head, whatever head_init says.
            task_init = family.baseline_init if method == "protonet" else family.task_init
            alg = make_algorithm(method, family.loss_fn, task_init, cfg)
            step_fn, init, put = jax.jit(alg.step, donate_argnums=0), alg.init, lambda b: b
            if _num_devices(cfg) > 1:  # the meta-batch's tasks split over a 'tasks' mesh axis
                mesh = mf.sharding.make_mesh(tasks=_num_devices(cfg))
                learner = mf.sharding.shard(alg, mesh, params)
                step_fn, init, put = learner.step, learner.init, learner.shard_episodes
            steps[name] = step_fn
            batches[name] = lambda step, f=family, put=put: put(
                f.meta_batch(cfg.seed, step, cfg.meta_batch_size)
            )
        unit, per_step = "tasks", cfg.meta_batch_size

    ckpt_dir = os.path.join(workdir, "checkpoints", method)
    mngr, state, meta = restore_latest(
        ckpt_dir, jax.eval_shape(init, params), cfg.checkpoints_to_keep
    )
    if state is None:
        state, meta = init(params), {"step": 0, "curve": [], "seconds": 0.0}
    else:
        print(f"{method}: resumed from step {meta['step']} ({ckpt_dir})")
    curve, seconds, step = meta["curve"], meta["seconds"], int(meta["step"])
    base_key = jax.random.key(cfg.seed)  # step keys are fold_in(base_key, step): resumable
    writer = _tensorboard(workdir, method)
    pending, start, first = [], time.perf_counter(), step
    with tqdm(
        total=cfg.num_steps, initial=step, desc=method, unit="step", disable=cfg.quiet
    ) as bar:
        while step < cfg.num_steps:
            name = names[step % len(names)]
            state, metrics = steps[name](
                state, batches[name](step // len(names)), jax.random.fold_in(base_key, step)
            )
            pending.append((name, metrics))
            step += 1
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                logged, pending = jax.device_get(pending), []  # also syncs the device
                for _, m in logged:
                    _check_finite(m, method, mngr)
                loss = float(np.mean([m["loss"] for _, m in logged]))
                scores = [m[f"query_{families[n].train_metric}"] for n, m in logged]
                curve.append([step, loss, float(np.mean(scores))])
                writer.add_scalar("train/loss", loss, step)
                for n in names:
                    metric = families[n].train_metric
                    values = [m[f"query_{metric}"] for k, m in logged if k == n]
                    if values:
                        tag = f"train/{n}/{metric}" if len(names) > 1 else f"train/{metric}"
                        writer.add_scalar(tag, float(np.mean(values)), step)
                rate = per_step * (step - first) / (time.perf_counter() - start)
                writer.add_scalar(f"train/{unit}_per_second", rate, step)
                bar.set_postfix_str(
                    f"loss={loss:.3f} query {families[names[0]].train_metric}="
                    f"{curve[-1][2]:.3f} {unit}/s={rate:.1f}",
                    refresh=False,
                )
                bar.update(step - bar.n)
            if step % cfg.checkpoint_every == 0 or step == cfg.num_steps:
                meta = {
                    "step": step,
                    "curve": curve,
                    "seconds": seconds + time.perf_counter() - start,
                }
                _save(mngr, step, state, meta)
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    return state.meta_params, curve, meta["seconds"]


def _check_finite(metrics, method, mngr) -> None:
    try:
        mf.check_finite(metrics)
    except FloatingPointError:
        mngr.wait_until_finished()
        last = mngr.latest_step()
        raise FloatingPointError(
            f"{method}: non-finite loss or gradient at step {int(metrics['step'])} "
            f"(loss={float(metrics['loss'])}); stopped. The last good checkpoint "
            f"(step {last}) is kept in {mngr.directory}. Lower inner_lr / outer_lr."
        ) from None


def _tensorboard(workdir: str, method: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tb", method))


# ----------------------------------------------------------------------------------------------
# Evaluation on meta-test classes / languages.


def val_score(adapt, inputs, shots: int, cfg, family: Family) -> float:
    """The mean metric after ``eval.report_steps`` steps on ``eval.val_episodes`` episodes of
    the meta-validation classes (never trained on, disjoint from the test classes). Scored at
    all of ``eval.steps``, so the test episodes' compiled program serves it."""
    val_cfg = with_fields(
        cfg, eval={"num_episodes": cfg.eval.val_episodes, "seed": cfg.eval.seed + 500}
    )
    steps = tuple(cfg.eval.steps)
    scores = family.val_evaluate(adapt, inputs, shots, steps, val_cfg)[family.metrics[0]]
    return float(np.mean(scores[:, steps.index(cfg.eval.report_steps)]))


def select_test_lr(params, shots: int, cfg, family: Family) -> tuple[float, float | None]:
    """``(lr, val)``: the test-time SGD learning rate of ProtoNet and the baselines at
    ``shots``, the best of ``eval.lr_grid`` by :func:`val_score`, and that score;
    ``(eval.inner_lr, None)`` where the family has no validation classes."""
    if family.val_evaluate is None:
        return cfg.eval.inner_lr, None
    adapt = fine_tune_adapt(family.loss_fn, family.baseline_init)
    vals = [
        val_score(adapt, (params, jnp.float32(lr)), shots, cfg, family) for lr in cfg.eval.lr_grid
    ]
    best = int(np.argmax(vals))
    return cfg.eval.lr_grid[best], vals[best]


def make_test_adapt(method: str, cfg, family: Family):
    """``adapt(params, support, key, num_steps) -> params`` as each method adapts at test time.

    Meta-learned methods use their own adaptation (learned inner LRs, ANIL's head-only updates);
    ProtoNet and the baselines fine-tune everything with SGD (from the prototype head, for
    classification), and their ``params`` are ``(params, lr)`` (see :func:`select_test_lr`).
    ``num_steps=0`` is no gradient step at all.
    """
    if method in FINE_TUNED:
        return fine_tune_adapt(family.loss_fn, family.baseline_init)
    alg = make_algorithm(method, family.loss_fn, family.task_init, cfg)

    def adapt(params, support, key, num_steps):
        if num_steps == 0:
            params = _base_params(method, params)
            return params if family.task_init is None else family.task_init(params, support)
        return alg.adapt(params, support, key, num_steps=num_steps)[0]

    return adapt


def evaluate(method: str, params, cfg, family: Family) -> dict:
    """``{"<k>-shot/<n>-step": {metric: {"mean", "ci95"}}}`` on ``eval.num_episodes`` meta-test
    episodes per shots setting (the same episodes for every method); for learned methods,
    ``"<k>-shot/val"``: the mean metric after ``eval.report_steps`` steps on the
    meta-validation episodes (what to choose hyperparameters on; families with validation
    classes only), and for fine-tuned ones ``"<k>-shot/lr"``: the test-time learning rate
    chosen there."""
    if method in BASELINES:
        params = family.to_task_params(params)
    out, steps = {}, tuple(cfg.eval.steps)
    for shots in cfg.eval.shots:
        if method in CENTROIDS:  # no learning, no adaptation: the same at every step
            scores = family.centroid_evaluate(shots, cfg, weighted=method == "idf_centroid")
            scores = {m: np.repeat(v[:, None], len(steps), 1) for m, v in scores.items()}
        else:
            inputs, adapt, val = params, make_test_adapt(method, cfg, family), None
            if method in FINE_TUNED:
                lr, val = select_test_lr(params, shots, cfg, family)
                out[f"{shots}-shot/lr"] = lr
                inputs = (params, jnp.float32(lr))
            elif family.val_evaluate is not None:
                val = val_score(adapt, inputs, shots, cfg, family)
            if val is not None:
                out[f"{shots}-shot/val"] = val
            scores = family.evaluate(adapt, inputs, shots, steps, cfg)
        for j, n in enumerate(steps):
            out[f"{shots}-shot/{n}-step"] = {
                m: dict(zip(("mean", "ci95"), mf.mean_ci95(v[:, j]), strict=True))
                for m, v in scores.items()
            }
    return out


# ----------------------------------------------------------------------------------------------
# The experiment.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every configured method, evaluates it on held-out tasks, writes the reports."""
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    if config.dataset == "mixed":
        families = mixed_families(config)
    else:
        tokenizer = None
        if config.tokenizer == "hf":
            tokenizer = text_sources.load_tokenizer(config.model.hf_path)
        families = {config.dataset: make_family(config, tokenizer)}

    results = {
        "config": config.to_dict(),
        "data": {name: f.info for name, f in families.items()},
        "methods": {},
    }
    for method in config.methods:
        done = os.path.join(workdir, "methods", f"{method}.json")
        if os.path.exists(done):  # finished in an earlier run of the same command
            with open(done) as f:
                results["methods"][method] = json.load(f)
            continue
        cfg = _method_config(config, method)
        params, curve, seconds = train_method(method, cfg, families, workdir)
        entry = {
            "train_seconds": seconds,
            "train_curve": curve,
            "report_steps": cfg.eval.report_steps,
            "scores": {
                name: evaluate(method, params, cfg, family) for name, family in families.items()
            },
        }
        os.makedirs(os.path.dirname(done), exist_ok=True)
        with open(done, "w") as f:
            json.dump(entry, f)
        results["methods"][method] = entry

    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    tables = [
        (f"### {name}\n\n" if len(families) > 1 else "")
        + results_table(results, config, name, family.metrics[0])
        for name, family in families.items()
    ]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n\n".join(tables) + "\n")
    _plot(results, config, {n: f.metrics[0] for n, f in families.items()}, workdir)
    print("\n\n".join(tables))
    print(f"\nwrote results.json, results.md and PNG plots to {workdir}")
    return results


def results_table(results: dict, config, family: str, metric: str) -> str:
    """Markdown: one row per method; per shots, ``metric`` before adaptation (0 steps: for
    classification the prototype head) and after the method's ``eval.report_steps`` steps
    (mean +- 95% CI over test episodes, in %); ``val``: the adapted metric per shots on the
    validation classes, where the family has them; ``test lr``: the fine-tuning learning rate
    per shots chosen on validation classes (ProtoNet and the baselines)."""
    shots = config.eval.shots
    head = f"| method ({metric}, {config.eval.num_episodes} test episodes) | "
    head += " | ".join(f"{k}-shot, 0 steps | {k}-shot, adapted" for k in shots)
    has_val = any(
        f"{shots[0]}-shot/val" in e["scores"].get(family, {}) for e in results["methods"].values()
    )
    val_head = f" | val ({config.eval.val_episodes} episodes)" if has_val else ""
    lines = [
        head + f"{val_head} | adapt steps | test lr | train s |",
        "|---" * (2 * len(shots) + 4 + has_val) + "|",
    ]
    for name, entry in results["methods"].items():
        if family not in entry["scores"]:
            continue
        cells = []
        for k in shots:
            for n in (0, entry["report_steps"]):
                c = entry["scores"][family][f"{k}-shot/{n}-step"][metric]
                cells.append(f"{100 * c['mean']:.1f} ± {100 * c['ci95']:.1f}")
        if has_val:
            vals = [entry["scores"][family].get(f"{k}-shot/val") for k in shots]
            cells.append(" / ".join(f"{100 * x:.1f}" for x in vals) if None not in vals else "-")
        lrs = [entry["scores"][family].get(f"{k}-shot/lr") for k in shots]
        lr_cell = " / ".join(f"{x:g}" for x in lrs) if None not in lrs else "-"
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {entry['report_steps']} | {lr_cell} | {entry['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _plot(results, config, metrics: dict[str, str], workdir: str) -> None:
    """``<metric>_vs_steps.png`` (per family: metric vs adaptation steps, one panel per shots
    setting, error bars = 95% CI) and ``training_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots, steps = config.eval.shots, config.eval.steps
    for family, metric in metrics.items():
        fig, axes = plt.subplots(1, len(shots), figsize=(4.5 * len(shots), 3.6), squeeze=False)
        for ax, k in zip(axes[0], shots, strict=True):
            for name, entry in results["methods"].items():
                s = [entry["scores"][family][f"{k}-shot/{n}-step"][metric] for n in steps]
                mean, ci = (100 * np.array([x[f] for x in s]) for f in ("mean", "ci95"))
                ax.errorbar(steps, mean, yerr=ci, marker="o", capsize=3, label=name)
            ax.set(
                xlabel="adaptation steps at test",
                ylabel=f"query {metric} (%)",
                title=f"{family}: {k}-shot",
            )
            ax.legend(fontsize=7)
        fig.tight_layout()
        prefix = f"{family}_" if len(metrics) > 1 else ""
        fig.savefig(os.path.join(workdir, f"{prefix}{metric}_vs_steps.png"), dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, entry in results["methods"].items():
        if entry["train_curve"]:
            x, loss, acc = zip(*entry["train_curve"], strict=True)
            axes[0].plot(x, loss, label=name)
            axes[1].plot(x, np.asarray(acc) * 100, label=name)
    axes[0].set(xlabel="step", ylabel="training loss (query, after adaptation)")
    axes[1].set(xlabel="step", ylabel="training query accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "training_curves.png"), dpi=110)
    plt.close(fig)


def _flags():
    """``(config, workdir)`` flags, defined only when run as a script (so that importing
    several experiment modules, as the tests do, never defines a flag twice)."""
    config = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "configs", "cldr.py")
    )
    workdir = flags.DEFINE_string(
        "workdir", None, "Outputs and checkpoints (default workdirs/<name>)."
    )
    return config, workdir


def main(config: ml_collections.ConfigDict, workdir: str | None) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    warnings.filterwarnings("ignore", message=".*fewer than shots.*")
    train_and_evaluate(config, workdir or os.path.join("workdirs", config.name))


if __name__ == "__main__":
    config_flag, workdir_flag = _flags()
    app.run(lambda argv: main(config_flag.value, workdir_flag.value))
