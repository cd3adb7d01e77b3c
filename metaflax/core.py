"""The functional kernel: episodes, the loss contract and the pure inner loop.

A model enters metaflax as one function, ``loss_fn(params, batch, key) -> (loss, metrics)``,
where ``loss`` is a scalar and ``metrics`` a (possibly empty) dict of scalars. Everything here
is a pure function of pytrees and composes with ``jax.jit``, ``jax.grad`` and ``jax.vmap``.
"""

from __future__ import annotations

import functools
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


def mixed_precision(loss_fn: LossFn, compute_dtype: Any = jnp.bfloat16) -> LossFn:
    """Wraps ``loss_fn`` to compute in ``compute_dtype`` (bfloat16) on float32 parameters.

    The floating leaves of the params and of the batch are cast to ``compute_dtype`` on the way
    in; the loss and the floating metrics come out in at least float32. The cast is
    differentiable and its gradient is cast back, so gradients have the params' own dtype: the
    meta-parameters, the inner and outer optimizer states, the inner updates and the
    meta-gradient all stay float32, and only the model's arithmetic (matmuls, activations) runs
    in bfloat16. Integer and boolean leaves (tokens, labels, masks) pass unchanged.

    Softmaxes, log-softmaxes and normalisation statistics are best kept in float32 inside the
    model and the loss; metaflax's models and heads do (``nnx.LayerNorm`` computes its
    statistics in float32). ``benchmarks/precision.py`` measures the speed and the meta-gradient
    error this gives.

    >>> import jax, jax.numpy as jnp
    >>> loss_fn = mixed_precision(lambda p, b, k: (jnp.sum(b @ p), {}))
    >>> loss, grads = jax.value_and_grad(lambda p: loss_fn(p, jnp.ones((2, 3)), None)[0])(
    ...     jnp.ones(3))
    >>> loss.dtype, grads.dtype
    (dtype('float32'), dtype('float32'))
    """
    dtype = jnp.dtype(compute_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"compute_dtype={dtype} must be a floating dtype, e.g. jnp.bfloat16.")

    def cast_floating(tree, dtype_fn):  # dtype_fn: a floating leaf's dtype -> its new dtype
        def leaf(x):
            old = jnp.result_type(x)
            return jnp.asarray(x).astype(dtype_fn(old)) if jnp.issubdtype(old, jnp.floating) else x

        return jax.tree.map(leaf, tree)

    def wrapped(params, batch, key):
        to_compute = lambda _: dtype  # noqa: E731
        loss, metrics = _call_loss(
            loss_fn, cast_floating(params, to_compute), cast_floating(batch, to_compute), key
        )
        at_least_f32 = lambda d: jnp.promote_types(d, jnp.float32)  # noqa: E731
        return cast_floating(loss, at_least_f32), cast_floating(metrics, at_least_f32)

    return wrapped


_UNROLL = 5  # inner loops of at most this many steps are unrolled


def _remat_segment(remat: bool | int) -> int:
    """0 (no remat), 1 (checkpoint every inner step) or c >= 2 (segments of c steps)."""
    if isinstance(remat, bool):
        return int(remat)
    if isinstance(remat, int) and remat >= 0:
        return remat
    raise ValueError(
        f"remat={remat!r} is not valid: use False, True (checkpoint every inner step) or an "
        "int c >= 2 (two-level checkpointing in segments of c inner steps)."
    )


def _checkpointed_loop(step: Callable, carry: PyTree, keys: jax.Array, segment: int):
    """``lax.scan(step, carry, keys)`` with ``step`` checkpointed, in segments of ``segment``.

    ``segment == 1``: the backward pass keeps one carry per step. ``segment = c > 1``: it keeps
    one carry per segment and recomputes each segment (one carry per step within it) when its
    turn comes, so ``num_steps / c + c`` carries instead of ``num_steps``, for one more forward
    pass of the inner steps. Always a loop: written out as straight-line code, XLA (CPU at least)
    runs the recomputation early and keeps every step's activations anyway.
    """
    n = keys.shape[0]
    full, rest = divmod(n, segment) if segment > 1 else (0, n)
    losses = []
    if full:

        @jax.checkpoint
        def run_segment(carry, segment_keys):
            return jax.lax.scan(step, carry, segment_keys)

        segment_keys = keys[: full * segment].reshape(full, segment, *keys.shape[1:])
        carry, seg_losses = jax.lax.scan(run_segment, carry, segment_keys)
        losses.append(jax.tree.map(lambda x: x.reshape(-1), seg_losses))
    if rest:
        carry, tail_losses = jax.lax.scan(step, carry, keys[full * segment :])
        losses.append(tail_losses)
    return carry, jax.tree.map(lambda *x: jnp.concatenate(x), *losses)


def make_adapt_fn(
    loss_fn: LossFn,
    inner_tx: optax.GradientTransformation,
    num_steps: int,
    *,
    first_order: bool = False,
    remat: bool | int = False,
    task_init: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> AdaptFn:
    """Builds the inner loop: ``num_steps`` updates of ``inner_tx`` on the support loss.

    The inner optimizer state is created by ``inner_tx.init`` inside the returned function, so
    differentiating through ``adapt`` is exact second order through the optimizer's updates and
    state (SGD, Adam, clipping chains, ...). ``first_order=True`` treats every inner update as a
    constant (FOMAML): d adapted / d params is the identity. ``remat=True`` recomputes each
    inner step in the backward pass, so activation memory does not grow with ``num_steps``; what
    still grows is one copy of the params (the scan's carry) per step, which ``remat=c`` cuts to
    about ``num_steps / c + c`` copies (``c ~ sqrt(num_steps)``; see benchmarks/README.md).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (scalar_loss, metrics_dict)``.
      inner_tx: any ``optax.GradientTransformation``.
      num_steps: number of inner updates, >= 1.
      first_order: stop gradients through the inner updates.
      remat: ``True`` checkpoints each inner step (``jax.checkpoint`` inside the scan); an int
        ``c >= 2`` also checkpoints segments of ``c`` steps (two-level checkpointing: fewer
        stored params copies, one more forward pass of the inner loop). Same numbers either way.
      task_init: optional ``task_init(params, support) -> params`` applied before the first
        inner step, differentiably: e.g. a classification head set from the support set's
        class prototypes (Proto-MAML) or zeroed per task (see :mod:`metaflax.heads`).

    Returns:
      ``adapt(params, support, key, shared=None, query=None) -> (adapted_params,
      inner_losses)`` where ``inner_losses`` has shape ``[num_steps]`` and holds the support loss
      before each update. With ``query=(batch, key)`` it returns ``(adapted_params,
      inner_losses, query_losses)``, ``query_losses[i]`` the loss on ``batch`` after update
      ``i + 1`` (MAML++'s multi-step loss differentiates their weighted sum).
      ``shared``, if given, must equal ``params`` in value: under ``vmap``, the meta-parameters
      closed over (not mapped), while ``params`` is their per-task copy from
      :func:`broadcast_to_tasks`. The first step's gradient is then taken at ``shared`` (one
      program over all tasks' support sets) and its update applied to ``params`` (whose
      cotangents :func:`broadcast_to_tasks` sums cheaply). Same numbers, faster on XLA:CPU.
      Used by written-out loops (``num_steps <= 5``, no ``remat``) without ``task_init``
      (which changes the parameters before the first step); ignored otherwise.

    >>> import jax, jax.numpy as jnp, optax
    >>> loss_fn = lambda p, b, k: (0.5 * jnp.sum((p - b) ** 2), {})
    >>> adapt = make_adapt_fn(loss_fn, optax.sgd(0.5), num_steps=1)
    >>> adapted, losses = adapt(jnp.array(0.0), jnp.array(2.0), jax.random.key(0))
    >>> float(adapted), losses.shape
    (1.0, (1,))
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1 (the number of inner updates).")
    segment = _remat_segment(remat)

    def adapt(params: PyTree, support: PyTree, key: jax.Array, shared: PyTree = None, query=None):
        def inner_step(carry, step_key, at=None):
            params, opt_state = carry
            (loss, _), grads = jax.value_and_grad(
                lambda p: _call_loss(loss_fn, p, support, step_key), has_aux=True
            )(params if at is None else at)
            updates, opt_state = inner_tx.update(grads, opt_state, params)
            if first_order:
                updates = jax.lax.stop_gradient(updates)
            params = optax.apply_updates(params, updates)
            if query is not None:
                loss = (loss, _call_loss(loss_fn, params, *query)[0])
            return (params, opt_state), loss

        if task_init is not None:
            params = task_init(params, support)
        carry = (params, inner_tx.init(params))
        step_keys = jax.random.split(key, num_steps)
        if segment:  # always a loop: see _checkpointed_loop
            (adapted, _), losses = _checkpointed_loop(
                jax.checkpoint(inner_step), carry, step_keys, segment
            )
        elif num_steps > _UNROLL:  # long loops stay a compact loop
            (adapted, _), losses = jax.lax.scan(inner_step, carry, step_keys)
        else:
            # Short loops are written out step by step, not as a scan: under vmap a scan's carry
            # is batched from the start, so the first step's gradient would run per-task matmuls
            # on copies of the meta-parameters; straight-line code takes it at ``shared``.
            per_step = []
            at = shared if task_init is None else None
            for step_key in step_keys:
                carry, loss = inner_step(carry, step_key, at)
                at = None
                per_step.append(loss)
            adapted, losses = carry[0], jax.tree.map(lambda *x: jnp.stack(x), *per_step)
        return (adapted, losses) if query is None else (adapted, *losses)

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
    num_tasks = next(iter(sizes.values()))
    if num_tasks == 0:
        raise ValueError("the meta-batch has 0 tasks; pass at least one episode.")
    return num_tasks


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_to_tasks(tree: PyTree, num_tasks: int) -> PyTree:
    """Every leaf of ``tree`` repeated along a new leading ``[num_tasks]`` axis, for ``vmap``.

    The same as closing over ``tree`` inside ``jax.vmap``, except for how the gradient is summed
    over tasks: as a pairwise tree of adds of the per-task slices instead of XLA's reduce over the
    leading axis, which XLA:CPU runs several times slower on large leaves such as an embedding
    table's per-task gradients (measurements: ``benchmarks/README.md``, PyTorch peers).
    """
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_tasks, *jnp.shape(x))), tree)


def _broadcast_fwd(tree, num_tasks):
    return broadcast_to_tasks(tree, num_tasks), None


def _broadcast_bwd(num_tasks, _, grads):
    def task_sum(g):
        parts = [g[i] for i in range(num_tasks)]
        while len(parts) > 1:
            pairs = [a + b for a, b in zip(parts[::2], parts[1::2], strict=False)]
            parts = pairs + parts[len(pairs) * 2 :]
        return parts[0]

    return (jax.tree.map(task_sum, grads),)


broadcast_to_tasks.defvjp(_broadcast_fwd, _broadcast_bwd)


def map_tasks(fn: Callable, task_map: str | int) -> Callable:
    """Maps ``fn`` over the leading task axis of its arguments.

    ``"vmap"`` runs all tasks in parallel, ``"scan"`` one after another (least memory), and an
    int ``c`` runs chunks of ``c`` tasks in parallel, one chunk after another. The sequential
    forms checkpoint ``fn``: differentiated, they keep one task's (one chunk's) intermediates at
    a time and recompute them in the backward pass, instead of storing every task's.
    """
    if task_map == "vmap":
        return jax.vmap(fn)
    one = jax.checkpoint(lambda x: fn(*x))
    if task_map == "scan":
        return lambda *xs: jax.lax.map(one, xs)
    if isinstance(task_map, int) and not isinstance(task_map, bool) and task_map >= 1:
        return lambda *xs: jax.lax.map(one, xs, batch_size=task_map)
    raise ValueError(
        f"task_map={task_map!r} is not valid: use 'vmap', 'scan' or a positive int chunk size."
    )
