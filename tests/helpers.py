"""Small models and data shared by the tests."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import metaflax as mf
from metaflax.models import MLP
from metaflax.tasks import mse_loss_fn, sample_sinusoid


def sinusoid_setup(hidden=(8, 8), tasks=3, shots=5, seed=0, dtype=jnp.float32):
    """An MLP regressor, its loss and a sinusoid meta-batch (optionally in float64)."""
    apply_fn, params = mf.functionalize(MLP([1, *hidden, 1], rngs=nnx.Rngs(seed)))
    episodes, _ = sample_sinusoid(jax.random.key(seed + 1), tasks, shots, shots)
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
    return mse_loss_fn(apply_fn), cast(params), cast(episodes)


def tree_allclose(a, b, rtol=1e-6, atol=1e-6):
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.allclose(x, y, rtol, atol), a, b))
    return all(bool(x) for x in leaves) and jax.tree.structure(a) == jax.tree.structure(b)


def make_algorithm(name, loss_fn, num_inner_steps=2):
    """Every algorithm of the kernel, configured alike (ANIL: adapt the last layer only)."""
    kw = dict(num_inner_steps=num_inner_steps)
    outer = optax.adam(1e-2)
    inner = optax.sgd(0.05)
    if name == "maml":
        return mf.maml(loss_fn, inner_tx=inner, outer_tx=outer, **kw)
    if name == "fomaml":
        return mf.maml(loss_fn, inner_tx=inner, outer_tx=outer, first_order=True, **kw)
    if name == "anil":
        mask = mf.path_filter(r"\[2\]")
        return mf.maml(loss_fn, inner_tx=inner, outer_tx=outer, adapt_mask=mask, **kw)
    if name == "reptile":  # the paper's outer SGD: Adam would amplify float32 rounding noise
        return mf.reptile(loss_fn, inner_tx=inner, outer_tx=optax.sgd(1.0), **kw)
    if name == "meta_sgd":
        return mf.meta_sgd(loss_fn, outer_tx=outer, init_lr=0.05, **kw)
    if name == "lslr":
        return mf.lslr(loss_fn, outer_tx=outer, init_lr=0.05, **kw)
    if name == "mamlpp":  # over three steps: first order with the multi-step loss, then neither
        return mf.lslr(
            loss_fn, outer_tx=outer, init_lr=0.05, multi_step_loss=2, first_order_steps=1, **kw
        )
    if name == "learned_opt":
        return mf.learned_optimizer(loss_fn, outer_tx=outer, init_lr=0.05, hidden=4, **kw)
    if name == "imaml":
        return mf.imaml(loss_fn, inner_tx=inner, outer_tx=outer, lam=10.0, cg_steps=3, **kw)
    raise ValueError(name)


ALGORITHMS = (
    "maml",
    "fomaml",
    "anil",
    "reptile",
    "meta_sgd",
    "lslr",
    "mamlpp",
    "learned_opt",
    "imaml",
)
