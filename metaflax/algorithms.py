"""Meta-learning algorithms as optax-style factories of pure functions.

Each factory validates its hyperparameters and returns a :class:`MetaAlgorithm`, a NamedTuple of
pure functions. All state goes in and comes out; ``step`` is ``meta_grad`` followed by
``outer_update``, exposed separately so the sharded modes (:mod:`metaflax.sharding`) can reduce
the meta-gradient across devices between the two.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metaflax.core import (
    Episode,
    LossFn,
    PyTree,
    broadcast_to_tasks,
    check_episodes,
    make_adapt_fn,
    map_tasks,
)

AdaptMask = PyTree | Callable[[PyTree], PyTree] | None


class MetaState(NamedTuple):
    """Outer-loop state: meta-parameters, outer optimizer state and the step counter."""

    meta_params: PyTree
    opt_state: optax.OptState
    step: jax.Array


class MetaAlgorithm(NamedTuple):
    """A meta-learning algorithm: a NamedTuple of pure functions.

    Attributes:
      init: ``init(params) -> MetaState``.
      step: ``step(state, episodes, key) -> (state, metrics)``; one outer update on a
        meta-batch (an ``Episode`` with a leading ``[tasks]`` axis). jit-able. ``key`` is one
        PRNG key, or one key per task (shape ``[tasks]``, sharded like the episodes).
      meta_loss: ``meta_loss(meta_params, episodes, key, step=None) -> (loss, metrics)``: the
        mean query loss after adaptation; differentiable (this is what MAML-family steps
        differentiate). ``step`` is the meta-step (``state.step``), read by the MAML++
        schedules (``multi_step_loss``, ``first_order_steps``); ``None`` means after them.
      meta_grad: ``meta_grad(meta_params, episodes, key, step=None) -> (grads, metrics)``: the
        mean meta-gradient over the tasks (Reptile: its pseudo-gradient), shaped like
        meta_params.
      outer_update: ``outer_update(state, grads, metrics) -> (state, metrics)``: applies
        ``outer_tx``; a non-finite loss or gradient leaves the state unchanged.
      adapt: ``adapt(meta_params, support, key, num_steps=None) -> (adapted_params,
        inner_losses)`` for one task (no task axis): few-shot adaptation at evaluation time,
        optionally with a different number of inner steps (>= 1) than in training. (Its ``shared=``
        argument is how meta-training passes the unmapped meta-parameters; see
        :func:`make_adapt_fn`.)
      model_params: ``model_params(meta_params) -> params``: the model's parameters inside the
        meta-parameters (Meta-SGD and LSLR also hold learned inner learning rates), e.g. to
        export or evaluate the meta-learned initialisation.
    """

    init: Callable[[PyTree], MetaState]
    step: Callable[[MetaState, Episode, jax.Array], tuple[MetaState, dict]]
    meta_loss: Callable[[PyTree, Episode, jax.Array], tuple[jax.Array, dict]]
    meta_grad: Callable[[PyTree, Episode, jax.Array], tuple[PyTree, dict]]
    outer_update: Callable[[MetaState, PyTree, dict], tuple[MetaState, dict]]
    adapt: Callable[..., tuple[PyTree, jax.Array]]
    model_params: Callable[[PyTree], PyTree]


def guarded_update(outer_tx: optax.GradientTransformation) -> Callable:
    """``update(state, grads, metrics) -> (state, metrics)``: one ``outer_tx`` step on a
    :class:`MetaState`, or the state unchanged where the loss or the gradient is not finite.
    Adds ``grad_norm`` and ``step`` to the metrics (what :func:`check_finite` reads). Every
    algorithm's ``outer_update``; also usable for plain (non-meta) training steps."""

    def outer_update(state, grads, metrics):
        updates, opt_state = outer_tx.update(grads, state.opt_state, state.meta_params)
        meta_params = optax.apply_updates(state.meta_params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new = MetaState(meta_params, opt_state, state.step + 1)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        # No separate "finite" output: check_finite derives it from loss and grad_norm, and every
        # extra output costs the step a host-side array, measurable on small, fast steps.
        return new, {**metrics, "grad_norm": grad_norm, "step": state.step}

    return outer_update


def _identity(params):
    return params


def _assemble(
    init_meta, outer_tx, meta_loss, meta_grad, adapt, model_params=_identity
) -> MetaAlgorithm:
    """Builds the MetaAlgorithm shared by every factory around its own meta_grad."""
    outer_update = guarded_update(outer_tx)

    def init(params):
        # Copy, so donating the state to a jitted step never deletes the caller's params.
        meta_params = init_meta(jax.tree.map(jnp.array, params))
        return MetaState(meta_params, outer_tx.init(meta_params), jnp.zeros((), jnp.int32))

    def step(state, episodes, key):
        grads, metrics = meta_grad(state.meta_params, episodes, key, step=state.step)
        return outer_update(state, grads, metrics)

    return MetaAlgorithm(init, step, meta_loss, meta_grad, outer_update, adapt, model_params)


def task_keys(key: jax.Array, num_tasks: int) -> jax.Array:
    """One PRNG key per task: ``key`` is split, or used as is if it already holds one per task."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single_ndim = 0 if typed else 1
    if key.ndim == single_ndim:
        return jax.random.split(key, num_tasks)
    if key.ndim == single_ndim + 1 and key.shape[0] == num_tasks:
        return key
    raise ValueError(
        f"key must be one PRNG key or one per task ([{num_tasks}] keys), got shape {key.shape}."
    )


# ----------------------------------------------------------------------------------------------
# Inner-loop transformations built from meta-parameters.


def path_filter(pattern: str) -> Callable[[PyTree], PyTree]:
    """A parameter filter: ``True`` for leaves whose key path matches the regex ``pattern``.

    Use it as ``adapt_mask`` to adapt only part of the model (ANIL adapts the head only).

    >>> mask_fn = path_filter(r"head")
    >>> mask_fn({"body": {"w": 1.0}, "head": {"w": 2.0}})
    {'body': {'w': False}, 'head': {'w': True}}
    """
    regex = re.compile(pattern)
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: regex.search(jax.tree_util.keystr(path)) is not None, params
    )


def adapt_only(
    inner_tx: optax.GradientTransformation, mask: AdaptMask
) -> optax.GradientTransformation:
    """Restricts ``inner_tx`` to the leaves where ``mask`` is True; the rest stay frozen.

    ``mask`` is a pytree of bools shaped like the params, or a function from params to one
    (e.g. :func:`path_filter`). Frozen leaves get zero updates and no optimizer state.

    >>> import jax.numpy as jnp, optax
    >>> tx = adapt_only(optax.sgd(1.0), {"body": False, "head": True})
    >>> params = {"body": jnp.ones(2), "head": jnp.ones(2)}
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["body"].tolist(), updates["head"].tolist()
    ([0.0, 0.0], [-1.0, -1.0])
    """
    if mask is None:
        return inner_tx

    def labels(params):
        m = mask(params) if callable(mask) else mask
        try:
            return jax.tree.map(lambda keep, _: "adapt" if keep else "freeze", m, params)
        except ValueError as e:
            raise ValueError(
                "adapt_mask must be a pytree of bools with the structure of the params (or a "
                f"function of the params returning one, like mf.path_filter): {e}"
            ) from None

    return optax.multi_transform({"adapt": inner_tx, "freeze": optax.set_to_zero()}, labels)


def scale_by_learned_lr(inner_lr: PyTree) -> optax.GradientTransformation:
    """``updates = -inner_lr * updates`` elementwise, with ``inner_lr`` shaped like the params.

    The Meta-SGD inner rule. ``inner_lr`` is usually a meta-parameter, so gradients flow into it.
    """

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda lr, u: -lr * u, inner_lr, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ScaleByStepLRState(NamedTuple):
    count: jax.Array


def scale_by_per_step_lr(inner_lr: PyTree) -> optax.GradientTransformation:
    """``updates = -inner_lr[leaf][t] * updates`` at inner step ``t`` (MAML++ LSLR).

    ``inner_lr`` has one vector of per-step learning rates per parameter tensor (layer). Past the
    last trained step the last learning rate is reused, so evaluation may run more steps.
    """

    def init(params):
        del params
        return ScaleByStepLRState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params

        def scale(lrs, u):
            return -lrs[jnp.minimum(state.count, lrs.shape[0] - 1)] * u

        return jax.tree.map(scale, inner_lr, updates), ScaleByStepLRState(state.count + 1)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------
# The MAML family: differentiate the query loss through the inner loop.


def _check_tx(name: str, tx: Any) -> None:
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"{name} must be an optax.GradientTransformation (e.g. optax.sgd(0.01)), got {tx!r}."
        )


def _check_common(num_inner_steps: int, outer_tx: Any, task_map: str | int) -> None:
    if not isinstance(num_inner_steps, int) or num_inner_steps < 1:
        raise ValueError(f"num_inner_steps={num_inner_steps!r} must be an int >= 1.")
    _check_tx("outer_tx", outer_tx)
    map_tasks(lambda x: x, task_map)  # validates task_map


def _adapt_tasks(
    adapt: Callable,
    loss_fn: LossFn,
    task_map: str | int,
    differentiated: bool = True,
    step_weights: Callable | None = None,
) -> Callable:
    """``adapt_tasks(meta_params, episodes, key, step=None) -> (adapted, metrics)``: every task
    adapted on its support set (``adapted`` has a leading ``[tasks]`` axis) and scored on its
    query set.

    ``differentiated``: the meta-gradient flows through ``adapt`` (the MAML family). Under
    ``vmap`` each task then adapts its own copy of the meta-parameters
    (:func:`broadcast_to_tasks`, whose cotangents are summed cheaply), with the first inner
    step's gradient taken at the shared ones (``adapt(..., shared=meta_params)``).
    ``step_weights(step) -> [num_inner_steps]``: the task's loss is the weighted sum of its query
    losses after every inner step (MAML++'s multi-step loss) when ``step`` is given."""

    def adapt_tasks(meta_params, episodes, key, step=None):
        num_tasks = check_episodes(episodes)
        weights = None if step_weights is None or step is None else step_weights(step)

        def one_task(params, episode, task_key, shared=None):
            inner_key, query_key = jax.random.split(task_key)
            if weights is None:
                adapted, inner_losses = adapt(params, episode.support, inner_key, shared=shared)
                loss, metrics = loss_fn(adapted, episode.query, query_key)
            else:
                adapted, inner_losses, step_losses = adapt(
                    params,
                    episode.support,
                    inner_key,
                    shared=shared,
                    query=(episode.query, query_key),
                )
                _, metrics = loss_fn(adapted, episode.query, query_key)
                loss = jnp.dot(weights.astype(step_losses.dtype), step_losses)
            return adapted, loss, metrics, inner_losses

        sharded = _explicit_task_sharding(episodes)
        if sharded is not None and task_map != "vmap":
            raise ValueError(
                f"task_map={task_map!r} runs the tasks one after another, which cannot run over "
                f"a [tasks] axis sharded over the Explicit mesh axis {sharded.spec[0]!r}; use "
                "task_map='vmap', or a mesh with Auto axes (mf.sharding.make_mesh)."
            )
        keys = task_keys(key, num_tasks)
        if sharded is not None:  # vmap needs every mapped input sharded alike
            keys = jax.sharding.reshard(keys, sharded)
        if task_map == "vmap" and differentiated:
            shared = meta_params
            if sharded is None:
                per_task = broadcast_to_tasks(meta_params, num_tasks)
            else:  # a plain broadcast, whose gradient is a sum over the sharded axis; and no
                # shared first step (its gradient would contract over the sharded axis)
                per_task = jax.tree.map(
                    lambda p: jax.sharding.reshard(
                        jnp.broadcast_to(p, (num_tasks, *p.shape)), sharded
                    ),
                    meta_params,
                )
                shared = None
            out = jax.vmap(lambda p, e, k: one_task(p, e, k, shared=shared))(
                per_task, episodes, keys
            )
        else:  # one copy of the meta-parameters, closed over
            out = map_tasks(functools.partial(one_task, meta_params), task_map)(episodes, keys)
        adapted, losses, metrics, inner_losses = out
        return adapted, _task_metrics(losses, metrics, inner_losses)

    return adapt_tasks


def _explicit_task_sharding(episodes):
    """How the episodes' ``[tasks]`` axis is sharded on a mesh with Explicit axes
    (``jax.make_mesh``'s default): a ``NamedSharding`` over that axis, for per-task arrays; None
    on one device, on Auto axes, or when the axis is not sharded."""
    sharding = getattr(jax.typeof(jax.tree.leaves(episodes)[0]), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return None
    return NamedSharding(sharding.mesh, P(spec[0]))


def _query_loss_after(
    adapt: Callable,
    loss_fn: LossFn,
    task_map: str | int,
    differentiated: bool = True,
    step_weights: Callable | None = None,
) -> Callable:
    """``meta_loss``: the mean over tasks of the query loss after ``adapt`` on the support set."""
    adapt_tasks = _adapt_tasks(adapt, loss_fn, task_map, differentiated, step_weights)

    def meta_loss(meta_params, episodes, key, step=None):
        _, metrics = adapt_tasks(meta_params, episodes, key, step)
        return metrics["loss"], metrics

    return meta_loss


def _grad_of(meta_loss: Callable) -> Callable:
    """``meta_grad``: the gradient of ``meta_loss`` w.r.t. the meta-parameters, with metrics."""

    def meta_grad(meta_params, episodes, key, step=None):
        (_, metrics), grads = jax.value_and_grad(meta_loss, has_aux=True)(
            meta_params, episodes, key, step
        )
        return grads, metrics

    return meta_grad


def _task_metrics(losses, metrics, inner_losses) -> dict:
    out = {"loss": jnp.mean(losses), "inner_losses": jnp.mean(inner_losses, axis=0)}
    out.update({f"query_{k}": jnp.mean(v) for k, v in metrics.items()})
    return out


def multi_step_loss_weights(num_inner_steps: int, anneal_steps: int, step) -> jax.Array:
    """MAML++'s weights of the query losses after each inner step, at meta-step ``step``.

    They start equal (``1 / n`` each); every weight but the last falls linearly to ``0.03 / n``
    over ``anneal_steps`` meta-steps while the last takes up the rest (they always sum to 1);
    from ``anneal_steps`` on, only the last step's loss counts (Antoniou et al. 2019, with
    epochs counted in meta-steps).

    >>> multi_step_loss_weights(4, 100, 0).tolist()
    [0.25, 0.25, 0.25, 0.25]
    >>> multi_step_loss_weights(4, 100, 100).tolist()
    [0.0, 0.0, 0.0, 1.0]
    """
    n = num_inner_steps
    done = jnp.asarray(step) / anneal_steps
    early = jnp.maximum((1.0 - done) / n, 0.03 / n) * (done < 1)
    weights = jnp.full((n,), early, jnp.float32)
    return weights.at[-1].set(1.0 - (n - 1) * early)


def _check_schedules(multi_step_loss: int, first_order_steps: int, first_order: bool) -> None:
    for name, value in (
        ("multi_step_loss", multi_step_loss),
        ("first_order_steps", first_order_steps),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r} must be an int >= 0 (a number of meta-steps).")
    if first_order and first_order_steps:
        raise ValueError(
            "first_order=True is first order at every meta-step; first_order_steps="
            f"{first_order_steps} anneals from first to second order: pass one of them."
        )


def _maml_family(
    loss_fn: LossFn,
    *,
    outer_tx: optax.GradientTransformation,
    num_inner_steps: int,
    init_meta: Callable[[PyTree], PyTree],
    inner_parts: Callable[[PyTree], tuple[PyTree, optax.GradientTransformation]],
    first_order: bool,
    remat: bool | int,
    task_map: str | int,
    task_init: Callable | None,
    multi_step_loss: int = 0,
    first_order_steps: int = 0,
) -> MetaAlgorithm:
    _check_common(num_inner_steps, outer_tx, task_map)
    _check_schedules(multi_step_loss, first_order_steps, first_order)

    def adapt_fn(first_order):
        def adapt(meta_params, support, key, num_steps=None, shared=None, query=None):
            params, inner_tx = inner_parts(meta_params)
            shared = None if shared is None else inner_parts(shared)[0]
            fn = make_adapt_fn(
                loss_fn,
                inner_tx,
                num_inner_steps if num_steps is None else num_steps,
                first_order=first_order,
                remat=remat,
                task_init=task_init,
            )
            return fn(params, support, key, shared, query)

        return adapt

    step_weights = None
    if multi_step_loss:
        step_weights = functools.partial(multi_step_loss_weights, num_inner_steps, multi_step_loss)
    adapt = adapt_fn(first_order)
    meta_loss = _query_loss_after(adapt, loss_fn, task_map, step_weights=step_weights)
    meta_grad = _grad_of(meta_loss)
    if first_order_steps:  # one program: lax.cond runs one of the two gradients per step
        second_order_grad = meta_grad
        first_order_grad = _grad_of(
            _query_loss_after(adapt_fn(True), loss_fn, task_map, step_weights=step_weights)
        )

        def meta_grad(meta_params, episodes, key, step=None):
            if step is None:
                return second_order_grad(meta_params, episodes, key)
            return jax.lax.cond(
                step < first_order_steps,
                first_order_grad,
                second_order_grad,
                meta_params,
                episodes,
                key,
                step,
            )

    return _assemble(
        init_meta,
        outer_tx,
        meta_loss,
        meta_grad,
        adapt,
        lambda meta_params: inner_parts(meta_params)[0],
    )


def maml(
    loss_fn: LossFn,
    *,
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    num_inner_steps: int,
    first_order: bool = False,
    remat: bool | int = False,
    task_map: str | int = "vmap",
    adapt_mask: AdaptMask = None,
    task_init: Callable | None = None,
    multi_step_loss: int = 0,
    first_order_steps: int = 0,
) -> MetaAlgorithm:
    """MAML (Finn et al. 2017): learn an initialisation that adapts well in a few inner steps.

    The meta-gradient is exact second order through ``inner_tx`` (any optax transformation,
    Adam included); ``first_order=True`` gives FOMAML. ``adapt_mask`` adapts only part of the
    parameters (ANIL: ``adapt_mask=mf.path_filter("head")``). ``state.meta_params`` are the
    model parameters.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (scalar_loss, metrics_dict)``.
      inner_tx: the inner-loop optimizer.
      outer_tx: the outer (meta) optimizer.
      num_inner_steps: inner updates per task during meta-training.
      first_order: FOMAML.
      remat: checkpoint each inner step (activation memory flat in ``num_inner_steps``);
        an int ``c >= 2`` checkpoints segments of ``c`` steps too (fewer params copies kept).
      task_map: ``"vmap"``, ``"scan"`` or an int chunk size: how tasks are mapped.
      adapt_mask: bool pytree or ``params -> bool pytree``; ``None`` adapts everything.
      task_init: ``task_init(params, support) -> params`` before the inner loop (e.g.
        Proto-MAML head initialisation); differentiated through like the rest.
      multi_step_loss: MAML++'s multi-step loss: for the first ``multi_step_loss`` meta-steps
        the task's loss is the weighted sum of its query losses after every inner step
        (:func:`multi_step_loss_weights`); 0 (off) scores the last step only.
      first_order_steps: MAML++'s derivative-order annealing: first order for the first
        ``first_order_steps`` meta-steps, then second order, in one compiled ``step`` (a
        ``lax.cond`` on ``state.step``, so the outer optimizer state carries over).

    >>> import jax, jax.numpy as jnp, optax
    >>> loss_fn = lambda p, b, k: (0.5 * jnp.mean((p - b) ** 2), {})
    >>> alg = maml(loss_fn, inner_tx=optax.sgd(0.1), outer_tx=optax.sgd(0.1), num_inner_steps=1)
    >>> state = alg.init(jnp.array(0.0))
    >>> episodes = Episode(support=jnp.ones((4, 5)), query=jnp.ones((4, 5)))
    >>> state, metrics = jax.jit(alg.step)(state, episodes, jax.random.key(0))
    >>> int(state.step)
    1
    """
    _check_tx("inner_tx", inner_tx)
    masked = adapt_only(inner_tx, adapt_mask)
    return _maml_family(
        loss_fn,
        outer_tx=outer_tx,
        num_inner_steps=num_inner_steps,
        init_meta=_identity,
        inner_parts=lambda meta_params: (meta_params, masked),
        first_order=first_order,
        remat=remat,
        task_map=task_map,
        task_init=task_init,
        multi_step_loss=multi_step_loss,
        first_order_steps=first_order_steps,
    )


def _check_lr(init_lr: float) -> None:
    if not math.isfinite(init_lr) or init_lr <= 0:
        raise ValueError(f"init_lr={init_lr} must be a positive finite learning rate.")


def _learned_rule(
    loss_fn,
    name: str,
    init_rule: Callable[[PyTree], PyTree],
    make_tx: Callable[[PyTree], optax.GradientTransformation],
    *,
    inner_tx,
    adapt_mask,
    **kwargs,
) -> MetaAlgorithm:
    """MAML whose inner update rule has meta-parameters of its own: ``meta_params`` is
    ``{"params": ..., name: init_rule(params)}`` and the inner optimizer
    ``make_tx(meta_params[name])``, after the optional ``inner_tx`` preprocessing."""
    if inner_tx is not None:
        _check_tx("inner_tx", inner_tx)

    def init_meta(params):
        return {"params": params, name: init_rule(params)}

    def inner_parts(meta_params):
        tx = make_tx(meta_params[name])
        if inner_tx is not None:
            tx = optax.chain(inner_tx, tx)
        return meta_params["params"], adapt_only(tx, adapt_mask)

    return _maml_family(loss_fn, init_meta=init_meta, inner_parts=inner_parts, **kwargs)


def meta_sgd(
    loss_fn: LossFn,
    *,
    outer_tx: optax.GradientTransformation,
    num_inner_steps: int,
    init_lr: float,
    inner_tx: optax.GradientTransformation | None = None,
    first_order: bool = False,
    remat: bool | int = False,
    task_map: str | int = "vmap",
    adapt_mask: AdaptMask = None,
    task_init: Callable | None = None,
    multi_step_loss: int = 0,
    first_order_steps: int = 0,
) -> MetaAlgorithm:
    """Meta-SGD (Li et al. 2017): MAML that also learns one inner learning rate per parameter.

    ``state.meta_params`` is ``{"params": ..., "inner_lr": ...}`` with ``inner_lr`` shaped like
    the params and initialised to ``init_lr``; the inner update is
    ``params - inner_lr * g``. An optional ``inner_tx`` preprocesses the gradient first (e.g.
    ``optax.clip_by_global_norm``). Other arguments as in :func:`maml`; with
    ``multi_step_loss`` and ``first_order_steps``, :func:`lslr` is MAML++'s meta-learner.

    >>> import jax.numpy as jnp, optax
    >>> alg = meta_sgd(lambda p, b, k: (jnp.mean((p - b) ** 2), {}), outer_tx=optax.adam(1e-3),
    ...                num_inner_steps=1, init_lr=0.01)
    >>> alg.init(jnp.zeros(3)).meta_params["inner_lr"]
    Array([0.01, 0.01, 0.01], dtype=float32)
    """
    _check_lr(init_lr)
    return _learned_rule(
        loss_fn,
        "inner_lr",
        lambda params: jax.tree.map(lambda p: jnp.full(jnp.shape(p), init_lr, p.dtype), params),
        scale_by_learned_lr,
        **_rule_kwargs(locals()),
    )


def lslr(
    loss_fn: LossFn,
    *,
    outer_tx: optax.GradientTransformation,
    num_inner_steps: int,
    init_lr: float,
    inner_tx: optax.GradientTransformation | None = None,
    first_order: bool = False,
    remat: bool | int = False,
    task_map: str | int = "vmap",
    adapt_mask: AdaptMask = None,
    task_init: Callable | None = None,
    multi_step_loss: int = 0,
    first_order_steps: int = 0,
) -> MetaAlgorithm:
    """MAML with learned per-layer, per-step inner learning rates (LSLR, MAML++; Antoniou 2019).

    ``state.meta_params`` is ``{"params": ..., "inner_lr": ...}`` where ``inner_lr`` holds one
    vector of ``num_inner_steps`` learning rates per parameter tensor. Arguments as in
    :func:`meta_sgd`.

    >>> import jax.numpy as jnp, optax
    >>> alg = lslr(lambda p, b, k: (jnp.mean((p - b) ** 2), {}), outer_tx=optax.adam(1e-3),
    ...            num_inner_steps=3, init_lr=0.01)
    >>> alg.init({"w": jnp.zeros((4, 4))}).meta_params["inner_lr"]["w"].shape
    (3,)
    """
    _check_lr(init_lr)
    return _learned_rule(
        loss_fn,
        "inner_lr",
        lambda params: jax.tree.map(
            lambda p: jnp.full((num_inner_steps,), init_lr, p.dtype), params
        ),
        scale_by_per_step_lr,
        **_rule_kwargs(locals()),
    )


def _rule_kwargs(args: dict) -> dict:
    """The arguments a learned-rule factory passes on to :func:`_learned_rule` unchanged."""
    names = ("outer_tx", "num_inner_steps", "inner_tx", "first_order", "remat", "task_map")
    names += ("adapt_mask", "task_init", "multi_step_loss", "first_order_steps")
    return {n: args[n] for n in names}


# ----------------------------------------------------------------------------------------------
# A meta-learned inner optimizer: a small network per parameter element.

LEARNED_OPTIMIZER_FEATURES = (
    "gradient",
    "momentum",
    "normalised gradient",
    "normalised momentum",
    "step",
)


def init_learned_optimizer(key: jax.Array, init_lr: float, hidden: int = 16) -> dict:
    """Weights of :func:`scale_by_learned_optimizer` that make it SGD at ``init_lr``: the
    network's output layer starts at zero (its hidden layer random, from ``key``)."""
    _check_lr(init_lr)
    width = len(LEARNED_OPTIMIZER_FEATURES)
    return {
        "lr": jnp.asarray(init_lr, jnp.float32),
        "w1": jax.random.normal(key, (width, hidden)) / np.sqrt(width),
        "b1": jnp.zeros((hidden,)),
        "w2": jnp.zeros((hidden,)),
        "b2": jnp.zeros(()),
    }


class LearnedOptimizerState(NamedTuple):
    count: jax.Array
    mu: PyTree
    nu: PyTree


def scale_by_learned_optimizer(
    weights: dict, num_steps: int, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
    """A learned update rule: ``update = -(lr * g + mlp(features))`` for every parameter element.

    The features are the gradient ``g``, its bias-corrected running mean ``m`` (``beta1``), both
    divided by the root of the bias-corrected running mean square (``beta2``), and the inner step
    ``t / num_steps`` (held at 1 past the trained steps); ``mlp`` has one tanh hidden layer
    (``weights`` from :func:`init_learned_optimizer`). Like Meta-SGD's rates, the weights are
    meta-parameters: MAML's exact second-order meta-gradient trains them (Andrychowicz et al.
    2016, Metz et al. 2022's small per-parameter learned optimizers, meta-trained through the
    unrolled inner loop). With the output layer at zero it is SGD at rate ``weights["lr"]``.
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return LearnedOptimizerState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.nu, updates)
        c1, c2 = 1 - beta1**count, 1 - beta2**count
        t = jnp.minimum(state.count / num_steps, 1.0)

        def rule(g, m, v):
            m, r = m / c1.astype(g.dtype), jax.lax.rsqrt(v / c2.astype(g.dtype) + eps)

            def row(name, i=None):  # a weight vector, broadcastable against g[..., None]
                w = weights[name] if i is None else weights[name][i]
                return jnp.reshape(w.astype(g.dtype), (1,) * g.ndim + (-1,))

            # the hidden layer: features @ w1 + b1, one feature at a time (the step feature is
            # the same for every element, and stays unsharded)
            hidden = row("b1") + t.astype(g.dtype) * row("w1", 4)
            for i, feature in enumerate((g, m, g * r, m * r)):
                hidden = hidden + feature[..., None] * row("w1", i)
            out = jnp.tanh(hidden) @ weights["w2"].astype(g.dtype) + weights["b2"]
            return -(weights["lr"] * g + out).astype(g.dtype)

        return jax.tree.map(rule, updates, mu, nu), LearnedOptimizerState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def learned_optimizer(
    loss_fn: LossFn,
    *,
    outer_tx: optax.GradientTransformation,
    num_inner_steps: int,
    init_lr: float,
    hidden: int = 16,
    seed: int = 0,
    inner_tx: optax.GradientTransformation | None = None,
    first_order: bool = False,
    remat: bool | int = False,
    task_map: str | int = "vmap",
    adapt_mask: AdaptMask = None,
    task_init: Callable | None = None,
    multi_step_loss: int = 0,
    first_order_steps: int = 0,
) -> MetaAlgorithm:
    """MAML with a meta-learned inner optimizer (:func:`scale_by_learned_optimizer`).

    ``state.meta_params`` is ``{"params": ..., "optimizer": ...}``: the model's initialisation
    and the update rule's weights, which start as SGD at ``init_lr`` (``hidden`` units, hidden
    layer drawn from ``seed``) and are meta-trained with the initialisation through the exact
    meta-gradient. Other arguments as in :func:`meta_sgd`.

    >>> import jax.numpy as jnp, optax
    >>> alg = learned_optimizer(lambda p, b, k: (jnp.mean((p - b) ** 2), {}),
    ...                         outer_tx=optax.adam(1e-3), num_inner_steps=2, init_lr=0.1)
    >>> sorted(alg.init(jnp.zeros(3)).meta_params["optimizer"])
    ['b1', 'b2', 'lr', 'w1', 'w2']
    """
    weights = init_learned_optimizer(jax.random.key(seed), init_lr, hidden)
    return _learned_rule(
        loss_fn,
        "optimizer",
        lambda params: jax.tree.map(jnp.array, weights),
        lambda w: scale_by_learned_optimizer(w, num_inner_steps),
        **_rule_kwargs(locals()),
    )


# ----------------------------------------------------------------------------------------------
# Reptile: move the initialisation towards the adapted parameters.


def reptile(
    loss_fn: LossFn,
    *,
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    num_inner_steps: int,
    task_map: str | int = "vmap",
    adapt_mask: AdaptMask = None,
    task_init: Callable | None = None,
) -> MetaAlgorithm:
    """Reptile (Nichol et al. 2018): no second derivatives, only inner loops on the support set.

    The outer pseudo-gradient ``meta_params - mean_i(adapted_params_i)`` goes through
    ``outer_tx``, so the paper's update ``theta += eps * sum_i (theta_i' - theta)`` over ``n``
    tasks is ``outer_tx=optax.sgd(eps * n)``. ``meta_loss`` reports the query loss after
    adaptation (for evaluation; its gradient is FOMAML's, not Reptile's update).

    >>> import jax, jax.numpy as jnp, optax
    >>> loss_fn = lambda p, b, k: (0.5 * jnp.mean((p - b) ** 2), {})
    >>> alg = reptile(loss_fn, inner_tx=optax.sgd(0.5), outer_tx=optax.sgd(1.0), num_inner_steps=1)
    >>> episodes = Episode(support=jnp.full((2, 3), 2.0), query=jnp.full((2, 3), 2.0))
    >>> state, _ = alg.step(alg.init(jnp.array(0.0)), episodes, jax.random.key(0))
    >>> float(state.meta_params)
    1.0
    """
    _check_common(num_inner_steps, outer_tx, task_map)
    _check_tx("inner_tx", inner_tx)
    masked = adapt_only(inner_tx, adapt_mask)

    def adapt(meta_params, support, key, num_steps=None, shared=None):
        del shared  # never given: Reptile's tasks close over the meta-parameters
        fn = make_adapt_fn(
            loss_fn,
            masked,
            num_inner_steps if num_steps is None else num_steps,
            first_order=True,
            task_init=task_init,
        )
        return fn(meta_params, support, key)

    adapt_tasks = _adapt_tasks(adapt, loss_fn, task_map, differentiated=False)
    meta_loss = _query_loss_after(adapt, loss_fn, task_map, differentiated=False)

    def meta_grad(meta_params, episodes, key, step=None):
        del step
        adapted, metrics = adapt_tasks(meta_params, episodes, key)  # adapted: [tasks, ...]
        pseudo_grad = jax.tree.map(lambda p, a: p - jnp.mean(a, axis=0), meta_params, adapted)
        return pseudo_grad, metrics

    return _assemble(_identity, outer_tx, meta_loss, meta_grad, adapt)


# ----------------------------------------------------------------------------------------------
# iMAML: the meta-gradient by implicit differentiation of a proximal inner problem.


def _conjugate_gradients(matvec: Callable, b: PyTree, steps: int, tol: float) -> PyTree:
    """``steps`` conjugate-gradient iterations for ``matvec(x) = b`` from ``x = 0``, written
    out; iterations after the residual falls to ``tol * |b|`` change nothing. (Not
    ``jax.scipy.sparse.linalg.cg``: its while loop cannot be vmapped over a task axis sharded
    on an Explicit mesh in this jax.)"""
    vdot, axpy = optax.tree.vdot, lambda a, x, y: jax.tree.map(lambda u, v: a * u + v, x, y)
    x = jax.tree.map(jnp.zeros_like, b)
    r = p = b
    rs = vdot(r, r)
    stop = tol**2 * rs
    for _ in range(steps):
        ap = matvec(p)
        active = rs > stop
        alpha = jnp.where(active, rs / jnp.where(active, vdot(p, ap), 1.0), 0.0)
        x, r = axpy(alpha, p, x), axpy(-alpha, ap, r)
        rs_new = vdot(r, r)
        beta = jnp.where(active, rs_new / jnp.where(active, rs, 1.0), 0.0)
        p = axpy(beta, p, r)
        rs = jnp.where(active, rs_new, rs)
    return x


def imaml(
    loss_fn: LossFn,
    *,
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    num_inner_steps: int,
    lam: float,
    cg_steps: int = 5,
    cg_tol: float = 0.0,
    task_map: str | int = "vmap",
    task_init: Callable | None = None,
) -> MetaAlgorithm:
    """iMAML (Rajeswaran et al. 2019): implicit meta-gradients, memory flat in the inner steps.

    Each task minimises the proximal support loss ``L(phi) + lam / 2 |phi - theta|^2`` from
    ``phi = theta`` with ``num_inner_steps`` updates of ``inner_tx``; the inner loop is not
    differentiated (nothing of it is kept). At a minimum ``phi*``, ``d phi* / d theta =
    (I + H / lam)^-1`` with ``H`` the Hessian of ``L`` at ``phi*``, so the task's meta-gradient
    is the ``v`` solving ``(I + H / lam) v = g``, ``g`` the query gradient at ``phi*``:
    ``cg_steps`` conjugate-gradient iterations (those after the residual falls below ``cg_tol``
    relative to ``g`` change nothing) on Hessian-vector products (reverse over reverse: unlike
    ``jax.jvp`` of ``jax.grad`` it also runs through models with ``custom_vjp`` parts). The
    gradient is exact where the inner loop has converged and CG has; it needs ``I + H / lam``
    positive definite (``lam`` above the largest negative curvature of ``L``).
    ``task_init`` (e.g. a prototype head) sets ``theta`` per task and is differentiated as usual.
    ``inner_losses`` are the proximal support losses. Other arguments as in :func:`maml`.

    >>> import jax, jax.numpy as jnp, optax
    >>> loss_fn = lambda p, b, k: (0.5 * jnp.sum((p - b) ** 2), {})
    >>> alg = imaml(loss_fn, inner_tx=optax.sgd(0.5), outer_tx=optax.sgd(1.0),
    ...             num_inner_steps=50, lam=1.0)
    >>> episodes = Episode(support=jnp.full((1, 1), 2.0), query=jnp.full((1, 1), 2.0))
    >>> grads, _ = alg.meta_grad(jnp.zeros(1), episodes, jax.random.key(0))
    >>> grads.round(4).tolist()  # phi* = (2 + theta) / 2: d/dtheta 0.5 (phi* - 2)^2 = -0.5
    [-0.5]
    """
    _check_common(num_inner_steps, outer_tx, task_map)
    _check_tx("inner_tx", inner_tx)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam={lam!r} must be a positive finite proximal strength.")
    if not isinstance(cg_steps, int) or cg_steps < 1:
        raise ValueError(f"cg_steps={cg_steps!r} must be an int >= 1.")
    if not cg_tol >= 0:
        raise ValueError(f"cg_tol={cg_tol!r} must be >= 0 (0: always cg_steps iterations).")

    def proximal_solve(center, support, key, num_steps):
        def proximal_loss(params, batch, step_key):
            loss, metrics = loss_fn(params, batch, step_key)
            sq = optax.tree.norm(jax.tree.map(jnp.subtract, params, center), squared=True)
            return loss + 0.5 * lam * sq, metrics

        fn = make_adapt_fn(proximal_loss, inner_tx, num_steps, first_order=True)
        return fn(center, support, key)

    def solver(num_steps):
        @jax.custom_vjp
        def solve(center, support, key):
            return proximal_solve(jax.lax.stop_gradient(center), support, key, num_steps)

        def fwd(center, support, key):
            out = solve(center, support, key)
            return out, (out[0], support, key)

        def bwd(residuals, cotangents):
            adapted, support, key = residuals
            grad_fn = jax.grad(lambda p: loss_fn(p, support, key)[0])

            def matvec(v):  # (I + H / lam) v, H v as the gradient of <grad L, v>
                hv = jax.grad(lambda p: optax.tree.vdot(grad_fn(p), v))(adapted)
                return jax.tree.map(lambda a, b: a + b / lam, v, hv)

            return _conjugate_gradients(matvec, cotangents[0], cg_steps, cg_tol), None, None

        solve.defvjp(fwd, bwd)
        return solve

    def adapt(meta_params, support, key, num_steps=None, shared=None):
        del shared  # the inner loop is not differentiated: nothing to share
        center = meta_params if task_init is None else task_init(meta_params, support)
        return solver(num_inner_steps if num_steps is None else num_steps)(center, support, key)

    meta_loss = _query_loss_after(adapt, loss_fn, task_map)
    return _assemble(_identity, outer_tx, meta_loss, _grad_of(meta_loss), adapt)


# ----------------------------------------------------------------------------------------------
# Prototypical networks: no inner loop, the task's classifier comes from the support set.


def protonet(
    loss_fn: LossFn,
    *,
    task_init: Callable[[PyTree, PyTree], PyTree],
    outer_tx: optax.GradientTransformation,
    task_map: str | int = "vmap",
) -> MetaAlgorithm:
    """Prototypical networks (Snell et al. 2017), the metric-learning baseline of meta-learning.

    The task's parameters are ``task_init(params, support)`` with no gradient step; with
    ``heads.classifier_task_init(encode_fn, "proto", ways)`` the head is ``W_c = 2 mu_c``,
    ``b_c = -|mu_c|^2``, whose softmax equals ProtoNet's softmax over ``-|x - mu_c|^2`` (the
    ``|x|^2`` term is the same for every class). ``meta_loss`` is the query loss of that
    classifier; ``adapt`` returns it (``inner_losses`` is empty).

    >>> import jax, jax.numpy as jnp, optax
    >>> alg = protonet(lambda p, b, k: (jnp.mean((p - b) ** 2), {}),
    ...                task_init=lambda p, s: p + jnp.mean(s), outer_tx=optax.sgd(0.1))
    >>> adapted, losses = alg.adapt(jnp.array(1.0), jnp.array([2.0, 4.0]), jax.random.key(0))
    >>> float(adapted), losses.shape
    (4.0, (0,))
    """
    _check_common(1, outer_tx, task_map)
    if not callable(task_init):
        raise TypeError("protonet needs task_init(params, support) -> params (the classifier).")

    def adapt(meta_params, support, key, num_steps=None, shared=None):
        del key, num_steps, shared
        return task_init(meta_params, support), jnp.zeros((0,))

    meta_loss = _query_loss_after(adapt, loss_fn, task_map)
    return _assemble(_identity, outer_tx, meta_loss, _grad_of(meta_loss), adapt)


# ----------------------------------------------------------------------------------------------
# The non-meta baseline, and every algorithm by name.


def multitask(loss_fn: LossFn, *, outer_tx: optax.GradientTransformation) -> MetaAlgorithm:
    """Plain training on pooled examples, the non-meta baseline, in the same shape as the
    meta-learners (state, NaN guard, checkpoints, sharding of the outer update).

    ``step(state, batch, key)`` takes one batch of examples (no :class:`Episode`, no inner
    loop) and applies ``outer_tx`` to the gradient of ``loss_fn`` on it; its metrics are
    ``loss`` and ``loss_fn``'s metrics as ``query_<name>``, like a meta-step's. ``adapt``
    returns the parameters unchanged: fine-tune them at test time with :func:`make_adapt_fn`.

    >>> import jax, jax.numpy as jnp, optax
    >>> alg = multitask(lambda p, b, k: (jnp.mean((p - b) ** 2), {}), outer_tx=optax.sgd(0.25))
    >>> state, metrics = alg.step(alg.init(jnp.array(0.0)), jnp.array([2.0]), jax.random.key(0))
    >>> float(state.meta_params), float(metrics["loss"])
    (1.0, 4.0)
    """
    _check_common(1, outer_tx, "vmap")

    def meta_loss(params, batch, key, step=None):
        del step
        loss, metrics = loss_fn(params, batch, key)
        return loss, {"loss": loss, **{f"query_{k}": v for k, v in metrics.items()}}

    def adapt(params, support, key, num_steps=None, shared=None):
        del support, key, num_steps, shared
        return params, jnp.zeros((0,))

    return _assemble(_identity, outer_tx, meta_loss, _grad_of(meta_loss), adapt)


ALGORITHMS = (
    "maml",
    "fomaml",
    "reptile",
    "meta_sgd",
    "lslr",
    "mamlpp",
    "anil",
    "imaml",
    "learned_opt",
    "protonet",
    "multitask",
)


def make_algorithm(
    name: str,
    loss_fn: LossFn,
    *,
    outer_tx: optax.GradientTransformation,
    inner_lr: float | None = None,
    num_inner_steps: int = 1,
    inner_transform: optax.GradientTransformation | None = None,
    adapt_mask: AdaptMask = None,
    task_init: Callable | None = None,
    **kwargs,
) -> MetaAlgorithm:
    """The algorithm called ``name`` (one of :data:`ALGORITHMS`) with inner SGD at
    ``inner_lr``: what a config's or a command line's method name means.

    ``inner_transform`` is applied to the inner gradients before the learning rate (e.g.
    ``optax.clip_by_global_norm``); Meta-SGD, LSLR and the learned optimizer start their
    learned rates at ``inner_lr``; ``"mamlpp"`` is LSLR with MAML++'s schedules (pass
    ``multi_step_loss`` and ``first_order_steps``); ``"anil"`` is MAML adapting ``adapt_mask``
    only (required); ``"imaml"`` needs ``lam``; ``"protonet"`` needs ``task_init`` (the
    prototype head, or the ridge-regression head for R2D2); ``"multitask"`` is
    :func:`multitask` and ignores the inner settings. ``kwargs`` (``remat``, ``task_map``,
    ``cg_steps``, ...) go to the factory.

    >>> import jax.numpy as jnp, optax
    >>> loss_fn = lambda p, b, k: (jnp.mean((p - b) ** 2), {})
    >>> alg = make_algorithm("meta_sgd", loss_fn, outer_tx=optax.adam(1e-3), inner_lr=0.1)
    >>> sorted(alg.init({"w": jnp.zeros(2)}).meta_params)
    ['inner_lr', 'params']
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}.")
    if name == "multitask":
        return multitask(loss_fn, outer_tx=outer_tx, **kwargs)
    if name == "protonet":
        return protonet(loss_fn, task_init=task_init, outer_tx=outer_tx, **kwargs)
    if inner_lr is None:
        raise ValueError(f"{name} adapts with inner SGD: pass inner_lr.")
    if name == "anil" and adapt_mask is None:
        raise ValueError("anil adapts only the head: pass adapt_mask (e.g. path_filter('head')).")
    if name == "mamlpp" and not {"multi_step_loss", "first_order_steps"} <= set(kwargs):
        raise ValueError(
            "mamlpp is LSLR with MAML++'s schedules: pass multi_step_loss and first_order_steps "
            "(numbers of meta-steps), e.g. a tenth and a quarter of the training steps."
        )
    if name == "imaml":
        if "lam" not in kwargs:
            raise ValueError("imaml needs lam, the proximal strength (e.g. lam=1.0).")
        if adapt_mask is not None:
            raise ValueError("imaml adapts every parameter: pass adapt_mask=None.")
    common = dict(outer_tx=outer_tx, num_inner_steps=num_inner_steps, task_init=task_init, **kwargs)
    if name in ("meta_sgd", "lslr", "mamlpp", "learned_opt"):
        factory = {"meta_sgd": meta_sgd, "learned_opt": learned_optimizer}.get(name, lslr)
        return factory(
            loss_fn, init_lr=inner_lr, inner_tx=inner_transform, adapt_mask=adapt_mask, **common
        )
    inner = optax.sgd(inner_lr)
    if inner_transform is not None:
        inner = optax.chain(inner_transform, inner)
    if name == "imaml":
        return imaml(loss_fn, inner_tx=inner, **common)
    common["adapt_mask"] = adapt_mask
    if name == "reptile":
        return reptile(loss_fn, inner_tx=inner, **common)
    return maml(loss_fn, inner_tx=inner, first_order=name == "fomaml", **common)


def check_finite(metrics: dict) -> None:
    """Raises ``FloatingPointError`` if a ``step`` skipped its update for a NaN/Inf loss.

    ``step`` never applies a non-finite update (the state is returned unchanged), so the last
    good meta-parameters are kept; call this on the host after each step (or chunk of steps).
    A step counts as non-finite where ``metrics["loss"]`` or (if present) ``metrics["grad_norm"]``
    is NaN/Inf: exactly the steps ``step`` skipped.
    """
    finite = np.isfinite(np.asarray(metrics["loss"])).ravel()
    if "grad_norm" in metrics:
        finite &= np.isfinite(np.asarray(metrics["grad_norm"])).ravel()
    if not finite.all():
        i = int(np.argmin(finite))
        bad = int(np.asarray(metrics["step"]).ravel()[i])
        loss = float(np.asarray(metrics["loss"]).ravel()[i])
        raise FloatingPointError(
            f"non-finite meta-loss or meta-gradient at step {bad} (loss={loss}); the update was "
            "skipped and the state before it is kept. If the loss is finite, a common cause is "
            "differentiating through optax.adam: pass eps_root=1e-8 so sqrt(v) has a finite "
            "derivative at v=0. Otherwise lower the inner/outer learning rates or clip the inner "
            "gradients (optax.clip_by_global_norm). Class labels outside [0, ways) also give "
            "a NaN loss in metaflax.heads.classification_loss_fn."
        )
