"""Meta-training (and the baselines' pretraining) of one method, resumable from its
checkpoints: the methods of :mod:`experiments.fewshot` and how each is built from a config."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import optax
from tqdm import tqdm

import metaflax as mf
from experiments import checkpoints
from experiments import workdir as wd
from experiments.configs.common import algorithm_kwargs, with_fields
from experiments.families import Family
from metaflax import heads

META_METHODS = ("maml", "fomaml", "reptile", "meta_sgd", "lslr", "mamlpp", "anil", "imaml")
META_METHODS += ("learned_opt", "protonet", "r2d2")
# meta_params = {"params": <the model>, <the inner rule's own meta-parameters>}
RULE_METHODS = ("meta_sgd", "lslr", "mamlpp", "learned_opt")
BASELINES = ("multitask", "scratch", "ngram_centroid", "idf_centroid")
CENTROIDS = ("ngram_centroid", "idf_centroid")  # no learning, no adaptation
FINE_TUNED = ("protonet", "multitask", "scratch")  # adapted at test by plain SGD fine-tuning
METHODS = META_METHODS + BASELINES


def num_devices(config) -> int:
    available = jax.device_count()
    n = config.num_devices or available
    if n > available:
        raise ValueError(f"num_devices={n} but only {available} devices exist; lower it.")
    return n


def method_config(config, method):
    return with_fields(config, **config.overrides.to_dict().get(method, {}))


def outer_tx(cfg):
    """Adam with linear warmup and cosine decay over ``num_steps``, after global-norm clipping."""
    warmup = min(cfg.warmup_steps, cfg.num_steps // 2 + 1)
    lr = optax.warmup_cosine_decay_schedule(
        0.0,
        cfg.outer_lr,
        warmup,
        max(cfg.num_steps, warmup + 1),  # a decay of >= 1 step
    )
    return optax.chain(optax.clip_by_global_norm(cfg.outer_clip), optax.adam(lr))


def head_init(method: str, cfg) -> str:
    """The classification head ``method`` starts each task with: ProtoNet's prototypes, R2D2's
    ridge regression, else ``cfg.head_init``."""
    return {"protonet": "proto", "r2d2": "ridge"}.get(method, cfg.head_init)


def model_params(method: str, cfg, params):
    """The initial model parameters of ``method``: with the ridge head (R2D2), its
    regularisation and scale too (``heads.init_ridge``)."""
    return {**params, "ridge": heads.init_ridge()} if head_init(method, cfg) == "ridge" else params


def make_algorithm(method: str, loss_fn, task_init, cfg) -> mf.MetaAlgorithm:
    """The algorithm of ``method`` (a meta-learner or ``multitask``) from its config: R2D2 is
    ProtoNet's algorithm with the ridge head; MAML++'s schedules and iMAML's settings come from
    ``cfg.mamlpp`` and ``cfg.imaml``."""
    return mf.make_algorithm(
        "protonet" if method == "r2d2" else method,
        loss_fn,
        outer_tx=outer_tx(cfg),
        inner_lr=cfg.inner_lr,
        num_inner_steps=cfg.num_inner_steps,
        adapt_mask=mf.path_filter("head") if method == "anil" else None,
        task_init=task_init,
        **algorithm_kwargs(method, cfg),
    )


def merged_params(families: dict[str, Family], multitask: bool = False):
    """One parameter tree for all families: the shared encoder and every family's head."""
    out = {}
    for family in families.values():
        params = family.pooled.params if multitask else family.params
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
    if method == "multitask":  # pooled batches, one device
        params = merged_params(families, multitask=True)
        for name, family in families.items():
            alg = make_algorithm(method, family.loss_fn, None, cfg)
            steps[name], init = jax.jit(alg.step, donate_argnums=0), alg.init
            batches[name] = lambda step, f=family: f.pooled.batch(cfg.seed, step)
        unit = "ex"
        per_step = np.mean([f.pooled.examples_per_step for f in families.values()])
    else:
        params = model_params(method, cfg, merged_params(families))
        for name, family in families.items():
            alg = make_algorithm(method, family.loss_fn, family.method_init(method), cfg)
            step_fn, init, put = jax.jit(alg.step, donate_argnums=0), alg.init, lambda b: b
            if num_devices(cfg) > 1:  # the meta-batch's tasks split over a 'tasks' mesh axis
                mesh = mf.sharding.make_mesh(tasks=num_devices(cfg))
                learner = mf.sharding.shard(alg, mesh, params)
                step_fn, init, put = learner.step, learner.init, learner.shard_episodes
            steps[name] = step_fn
            batches[name] = lambda step, f=family, put=put: put(
                f.meta_batch(cfg.seed, step, cfg.meta_batch_size)
            )
        unit, per_step = "tasks", cfg.meta_batch_size

    ckpt_dir = os.path.join(workdir, "checkpoints", method)
    fingerprint = wd.fingerprint(cfg)
    mngr, state, meta = checkpoints.restore_latest(
        ckpt_dir, jax.eval_shape(init, params), cfg.checkpoints_to_keep, fingerprint
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
                    "fingerprint": fingerprint,
                    "step": step,
                    "curve": curve,
                    "seconds": seconds + time.perf_counter() - start,
                }
                checkpoints.save(mngr, step, state, meta)
    checkpoints.wait(mngr)
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
