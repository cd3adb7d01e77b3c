"""The functional kernel: episodes, the loss contract and the pure inner loop.

A model enters metaflax as one function, ``loss_fn(params, batch, key) -> (loss, metrics)``,
where ``loss`` is a scalar and ``metrics`` a (possibly empty) dict of scalars. Everything here
is a pure function of pytrees and composes with ``jax.jit``, ``jax.grad`` and ``jax.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict]]
AdaptFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array]]


class Episode(NamedTuple):
    """One few-shot task: a ``support`` batch to adapt on and a ``query`` batch to score.

    Both halves are pytrees of arrays with the same structure (e.g. dicts with the same keys).
    A meta-batch is an ``Episode`` whose leaves carry a leading ``[tasks]`` axis.

    >>> import jax.numpy as jnp
    >>> ep = Episode(support={"x": jnp.zeros((4, 10, 1))}, query={"x": jnp.zeros((4, 10, 1))})
    >>> ep.support["x"].shape  # [tasks, shots, 1]
    (4, 10, 1)
    """

    support: PyTree
    query: PyTree


def _call_loss(loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array):
    out = loss_fn(params, batch, key)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        raise TypeError(
            "loss_fn(params, batch, key) must return (scalar_loss, metrics_dict); got "
            f"{type(out).__name__}. Return `loss, {{}}` when there are no metrics."
        )
    loss, metrics = out
    if jnp.shape(loss) != ():
        raise ValueError(
            f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}; reduce it "
            "(e.g. jnp.mean over the batch) inside loss_fn."
        )
    return loss, metrics


_UNROLL = 5  # inner loops of at most this many steps are unrolled


def make_adapt_fn(
    loss_fn: LossFn,
    inner_tx: optax.GradientTransformation,
    num_steps: int,
    *,
    first_order: bool = False,
    remat: bool = False,
    task_init: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> AdaptFn:
    """Builds the inner loop: ``num_steps`` updates of ``inner_tx`` on the support loss.

    The inner optimizer state is created by ``inner_tx.init`` inside the returned function, so
    differentiating through ``adapt`` is exact second order through the optimizer's updates and
    state (SGD, Adam, clipping chains, ...). ``first_order=True`` treats every inner update as a
    constant (FOMAML): d adapted / d params is the identity. ``remat=True`` recomputes each
    inner step in the backward pass, so activation memory does not grow with ``num_steps``.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (scalar_loss, metrics_dict)``.
      inner_tx: any ``optax.GradientTransformation``.
      num_steps: number of inner updates, >= 1.
      first_order: stop gradients through the inner updates.
      remat: checkpoint each inner step (``jax.checkpoint`` inside the scan).
      task_init: optional ``task_init(params, support) -> params`` applied before the first
        inner step, differentiably: e.g. a classification head set from the support set's
        class prototypes (Proto-MAML) or zeroed per task (see :mod:`metaflax.heads`).

    Returns:
      ``adapt(params, support, key) -> (adapted_params, inner_losses)`` where ``inner_losses``
      has shape ``[num_steps]`` and holds the support loss before each update.

    >>> import jax, jax.numpy as jnp, optax
    >>> loss_fn = lambda p, b, k: (0.5 * jnp.sum((p - b) ** 2), {})
    >>> adapt = make_adapt_fn(loss_fn, optax.sgd(0.5), num_steps=1)
    >>> adapted, losses = adapt(jnp.array(0.0), jnp.array(2.0), jax.random.key(0))
    >>> float(adapted), losses.shape
    (1.0, (1,))
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1 (the number of inner updates).")

    def adapt(params: PyTree, support: PyTree, key: jax.Array):
        def inner_step(carry, step_key):
            params, opt_state = carry
            (loss, _), grads = jax.value_and_grad(
                lambda p: _call_loss(loss_fn, p, support, step_key), has_aux=True
            )(params)
            updates, opt_state = inner_tx.update(grads, opt_state, params)
            if first_order:
                updates = jax.lax.stop_gradient(updates)
            return (optax.apply_updates(params, updates), opt_state), loss

        if remat:
            inner_step = jax.checkpoint(inner_step)
        if task_init is not None:
            params = task_init(params, support)
        carry = (params, inner_tx.init(params))
        step_keys = jax.random.split(key, num_steps)
        if num_steps > _UNROLL:  # long loops stay a compact loop
            (adapted, _), inner_losses = jax.lax.scan(inner_step, carry, step_keys)
            return adapted, inner_losses
        # Short loops are written out step by step, not as a scan: under vmap a scan's carry is
        # batched from the start, so the meta-parameters would be broadcast to every task before
        # the first step (and its backward pass would run per-task matmuls then sum them);
        # straight-line code keeps the first step on the shared parameters.
        losses = []
        for step_key in step_keys:
            carry, loss = inner_step(carry, step_key)
            losses.append(loss)
        return carry[0], jnp.stack(losses)

    return adapt


def check_episodes(episodes: Episode) -> int:
    """Validates a meta-batch and returns its number of tasks.

    Raises a ``ValueError`` naming the fix when the halves have different structures or the
    leaves do not share one leading ``[tasks]`` axis.
    """
    if not isinstance(episodes, Episode):
        raise TypeError(f"expected an mf.Episode(support, query), got {type(episodes).__name__}.")
    s_struct = jax.tree.structure(episodes.support)
    q_struct = jax.tree.structure(episodes.query)
    if s_struct != q_struct:
        raise ValueError(
            "support and query must have the same pytree structure (same keys); got\n"
            f"  support: {s_struct}\n  query:   {q_struct}"
        )
    sizes = {}
    for half in ("support", "query"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(episodes, half)):
            shape = jnp.shape(leaf)
            name = f"{half}{jax.tree_util.keystr(path)}"
            if len(shape) == 0:
                raise ValueError(
                    f"{name} is a scalar; episodes need a leading [tasks] axis on every leaf. "
                    "Stack single episodes with jax.tree.map(lambda *x: jnp.stack(x), *eps)."
                )
            sizes[name] = shape[0]
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            "every leaf of a meta-batch must share the leading [tasks] axis, but leading sizes "
            f"differ ({listing}). Did you pass a single episode? Add a task axis with "
            "jax.tree.map(lambda x: x[None], episode)."
        )
    return next(iter(sizes.values()))


def map_tasks(fn: Callable, task_map: str | int) -> Callable:
    """Maps ``fn`` over the leading task axis of its arguments.

    ``"vmap"`` runs all tasks in parallel, ``"scan"`` one after another (least memory), and an
    int ``c`` runs chunks of ``c`` tasks in parallel, one chunk after another.
    """
    if task_map == "vmap":
        return jax.vmap(fn)
    if task_map == "scan":
        return lambda *xs: jax.lax.map(lambda x: fn(*x), xs)
    if isinstance(task_map, int) and not isinstance(task_map, bool) and task_map >= 1:
        return lambda *xs: jax.lax.map(lambda x: fn(*x), xs, batch_size=task_map)
    raise ValueError(
        f"task_map={task_map!r} is not valid: use 'vmap', 'scan' or a positive int chunk size."
    )
