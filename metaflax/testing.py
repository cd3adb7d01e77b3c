"""Oracles for meta-learning code: what a user writes without metaflax.

:func:`reference_step` is MAML, FOMAML or Reptile hand-written in plain jax + optax (a Python
loop of ``jax.grad`` + SGD per task, ``vmap`` over tasks, ``optax.adam`` outside). It computes
the same numbers as :func:`metaflax.maml` / :func:`metaflax.reptile` with inner
``optax.sgd(inner_lr)`` and outer ``optax.adam(outer_lr)``, so tests check the library against
it and benchmarks time the library's overhead over it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from metaflax.core import LossFn, check_episodes

KINDS = ("maml", "fomaml", "reptile")


def reference_step(
    kind: str, loss_fn: LossFn, inner_lr: float, outer_lr: float, num_inner_steps: int
) -> tuple[Callable, optax.GradientTransformation]:
    """``(step, outer_tx)``: ``step(params, opt_state, episodes, key) -> (params, opt_state,
    loss)``, one meta-step of ``kind`` written out by hand, and the outer ``optax.adam``.

    >>> import jax, jax.numpy as jnp
    >>> import metaflax as mf
    >>> loss_fn = lambda p, b, k: (jnp.mean((p - b) ** 2), {})
    >>> step, outer = reference_step("maml", loss_fn, 0.1, 0.01, num_inner_steps=1)
    >>> episodes = mf.Episode(jnp.ones((2, 3)), jnp.ones((2, 3)))
    >>> params, _, loss = step(jnp.array(0.0), outer.init(jnp.array(0.0)), episodes,
    ...                        jax.random.key(0))
    >>> round(float(loss), 4), round(float(params), 4)
    (0.64, 0.01)
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; valid: {', '.join(KINDS)}.")
    outer = optax.adam(outer_lr)

    def adapt(params, support, key):
        for k in jax.random.split(key, num_inner_steps):
            grads = jax.grad(lambda p, k=k: loss_fn(p, support, k)[0])(params)
            if kind != "maml":
                grads = jax.lax.stop_gradient(grads)
            params = jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)
        return params

    def task(params, episode, key):
        inner_key, query_key = jax.random.split(key)
        adapted = adapt(params, episode.support, inner_key)
        return loss_fn(adapted, episode.query, query_key)[0], adapted

    def step(params, opt_state, episodes, key):
        keys = jax.random.split(key, check_episodes(episodes))
        if kind == "reptile":
            losses, adapted = jax.vmap(task, (None, 0, 0))(params, episodes, keys)
            grads = jax.tree.map(lambda p, a: p - jnp.mean(a, 0), params, adapted)
            loss = jnp.mean(losses)
        else:

            def meta_loss(p):
                return jnp.mean(jax.vmap(lambda e, k: task(p, e, k)[0])(episodes, keys))

            loss, grads = jax.value_and_grad(meta_loss)(params)
        updates, opt_state = outer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, outer
