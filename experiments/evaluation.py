"""Few-shot evaluation of a trained method on held-out classes or languages: each method's
test-time adaptation, the fine-tuned methods' learning rate chosen on validation classes, and
mean +- 95% CI over the same episodes for every method."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import metaflax as mf
from experiments.configs.common import with_fields
from experiments.families import Family, fine_tune_adapt
from experiments.training import BASELINES, CENTROIDS, FINE_TUNED, make_algorithm


def val_score(adapt, inputs, shots: int, cfg, family: Family) -> float:
    """The mean metric after ``eval.report_steps`` steps on ``eval.val_episodes`` episodes of
    the meta-validation classes (never trained on, disjoint from the test classes). Scored at
    all of ``eval.steps``, so the test episodes' compiled program serves it."""
    val_cfg = with_fields(
        cfg, eval={"num_episodes": cfg.eval.val_episodes, "seed": cfg.eval.seed + 500}
    )
    steps = tuple(cfg.eval.steps)
    scores = family.classes.val_evaluate(adapt, inputs, shots, steps, val_cfg)
    scores = scores[family.metrics[0]]
    return float(np.mean(scores[:, steps.index(cfg.eval.report_steps)]))


def _has_val(family: Family) -> bool:
    return family.classes is not None and family.classes.val_evaluate is not None


def select_test_lr(params, shots: int, cfg, family: Family) -> tuple[float, float | None]:
    """``(lr, val)``: the test-time SGD learning rate of ProtoNet and the baselines at
    ``shots``, the best of ``eval.lr_grid`` by :func:`val_score`, and that score;
    ``(eval.inner_lr, None)`` where the family has no validation classes."""
    if not _has_val(family):
        return cfg.eval.inner_lr, None
    adapt = fine_tune_adapt(family.loss_fn, family.baseline_init)
    vals = [
        val_score(adapt, (params, jnp.float32(lr)), shots, cfg, family) for lr in cfg.eval.lr_grid
    ]
    best = int(np.argmax(vals))
    return cfg.eval.lr_grid[best], vals[best]


def make_test_adapt(method: str, cfg, loss_fn, task_init, baseline_init):
    """``adapt(params, support, key, num_steps) -> params`` as each method adapts at test time.

    Meta-learned methods use their own adaptation (learned inner LRs, ANIL's head-only updates);
    ProtoNet and the baselines fine-tune everything with SGD (from the prototype head, for
    classification), and their ``params`` are ``(params, lr)`` (see :func:`select_test_lr`).
    ``num_steps=0`` is no gradient step at all.
    """
    if method in FINE_TUNED:
        return fine_tune_adapt(loss_fn, baseline_init)
    alg = make_algorithm(method, loss_fn, task_init, cfg)

    def adapt(params, support, key, num_steps):
        if num_steps == 0:
            params = alg.model_params(params)
            return params if task_init is None else task_init(params, support)
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
            scores = family.classes.centroid_evaluate(shots, cfg, weighted=method == "idf_centroid")
            scores = {m: np.repeat(v[:, None], len(steps), 1) for m, v in scores.items()}
        else:
            inputs, adapt, val = (
                params,
                make_test_adapt(
                    method, cfg, family.loss_fn, family.method_init(method), family.baseline_init
                ),
                None,
            )
            if method in FINE_TUNED:
                lr, val = select_test_lr(params, shots, cfg, family)
                out[f"{shots}-shot/lr"] = lr
                inputs = (params, jnp.float32(lr))
            elif _has_val(family):
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
