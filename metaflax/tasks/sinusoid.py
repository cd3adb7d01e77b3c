"""The sinusoid regression task family of the MAML paper (Finn et al. 2017, section 5.1).

A task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase ``~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``. Sampling is a pure function of the key, so it runs inside ``jit``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from metaflax.core import Episode

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, jnp.pi)
X_RANGE = (-5.0, 5.0)


def sample_sinusoid(
    key: jax.Array, num_tasks: int, num_support: int, num_query: int
) -> tuple[Episode, dict]:
    """Samples a meta-batch of sinusoid tasks.

    Returns:
      ``(episodes, task_params)``: ``episodes.support`` / ``.query`` are dicts with ``x`` and
      ``y`` of shape ``[tasks, shots, 1]``; ``task_params`` holds ``amplitude`` and ``phase``
      of shape ``[tasks]`` (for plotting the true functions).

    >>> import jax
    >>> episodes, _ = sample_sinusoid(jax.random.key(0), num_tasks=25, num_support=10, num_query=10)
    >>> episodes.support["x"].shape
    (25, 10, 1)
    """
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amplitude = jax.random.uniform(k_amp, (num_tasks,), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(k_phase, (num_tasks,), minval=PHASE[0], maxval=PHASE[1])
    x = jax.random.uniform(
        k_x, (num_tasks, num_support + num_query, 1), minval=X_RANGE[0], maxval=X_RANGE[1]
    )
    y = amplitude[:, None, None] * jnp.sin(x - phase[:, None, None])
    split = lambda a: (a[:, :num_support], a[:, num_support:])  # noqa: E731
    (xs, xq), (ys, yq) = split(x), split(y)
    episodes = Episode(support={"x": xs, "y": ys}, query={"x": xq, "y": yq})
    return episodes, {"amplitude": amplitude, "phase": phase}


def mse_loss_fn(apply_fn: Callable) -> Callable:
    """The regression ``loss_fn(params, batch, key) -> (mse, {})`` for batches ``{x, y}``."""

    def loss_fn(params, batch, key):
        del key
        return jnp.mean(jnp.square(apply_fn(params, batch["x"]) - batch["y"])), {}

    return loss_fn
