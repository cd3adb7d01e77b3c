"""The edge between flax.nnx modules and metaflax's pure functions of pytrees."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def functionalize(module: nnx.Module, method: str = "__call__") -> tuple[Callable[..., Any], dict]:
    """Splits an nnx module once into ``apply_fn(params, *args, **kwargs)`` and its params.

    ``params`` is a plain nested dict of arrays (the module's ``nnx.Param`` leaves), so it
    works with optax, orbax and every jax transform; non-parameter state (e.g. RNG counters)
    is frozen into ``apply_fn``. This is the only place metaflax touches flax.nnx: the rest of
    the library sees pytrees. ``method`` names another method to call with the same params,
    e.g. a decoder's ``decode_step``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> apply_fn, params = functionalize(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> sorted(params), apply_fn(params, jnp.ones((5, 3))).shape
    (['bias', 'kernel'], (5, 2))
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"functionalize expects a flax.nnx.Module, got {type(module).__name__}.")
    if not callable(getattr(type(module), method, None)):  # a method, not a submodule
        raise AttributeError(f"{type(module).__name__} has no method {method!r}.")
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    expected = jax.tree.map(jnp.shape, params)

    def apply_fn(params: dict, *args, **kwargs):
        shapes = jax.tree.map(jnp.shape, params)
        if shapes != expected:  # a trace-time check: e.g. a state saved from another model
            raise ValueError(
                f"params do not fit this {type(module).__name__}: expected the structure and "
                f"shapes\n  {_brief(expected)}\ngot\n  {_brief(shapes)}\n(parameters or a "
                "state from another model or config?)"
            )
        return getattr(nnx.merge(graphdef, nnx.State(params), rest), method)(*args, **kwargs)

    return apply_fn, params


def _brief(shapes, limit: int = 400) -> str:
    text = str(shapes)
    return text if len(text) <= limit else text[:limit] + " ..."
