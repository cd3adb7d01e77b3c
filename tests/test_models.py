"""Reference models and the nnx edge."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from flax import nnx

import metaflax as mf
from metaflax.models import (
    MLP,
    Conv4,
    TextClassifier,
    batched_matmul,
    conv3x3,
    dense_dot_general,
    dot_product_attention,
    max_pool_2x2,
)


def test_functionalize_matches_the_module():
    model = MLP([3, 16, 2], rngs=nnx.Rngs(0))
    apply_fn, params = mf.functionalize(model)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    np.testing.assert_array_equal(apply_fn(params, x), model(x))
    assert isinstance(params, dict) and set(params["layers"][0]) == {"bias", "kernel"}


def test_dense_and_batched_matmul_equal_lax_to_third_order(x64):
    # Its custom VJP must give JAX's own derivatives at every order MAML uses (and more), on
    # a batched input under vmap, as in a meta-batch of tasks with per-task weights.
    dims = (((2,), (0,)), ((), ()))
    x = jax.random.normal(jax.random.key(0), (3, 4, 5, 6))  # [tasks, batch, seq, d]
    w = jax.random.normal(jax.random.key(1), (3, 6, 7))
    v = jax.random.normal(jax.random.key(2), (3, 6, 7))

    def third(dot):
        f = lambda w, x: jnp.sum(jnp.sin(dot(x, w, dims)))  # noqa: E731
        hvp = lambda w, x, v: jax.grad(lambda w: jnp.vdot(jax.grad(f)(w, x), v))(w)  # noqa: E731
        return jax.vmap(jax.grad(lambda w, x, v: jnp.sum(jnp.cos(hvp(w, x, v))), (0, 1)))(w, x, v)

    for got, want in zip(
        jax.tree.leaves(third(dense_dot_general)),
        jax.tree.leaves(third(jax.lax.dot_general)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    # The attention products: batched_matmul against jnp.matmul, likewise to third order.
    def bmm(mm):  # x: [batch, seq, d] @ w: [batch, d, e], w the same for every batch row
        return lambda x, w, dims: mm(x, jnp.broadcast_to(w, (*x.shape[:-2], *w.shape)))

    for got, want in zip(
        jax.tree.leaves(third(bmm(batched_matmul))),
        jax.tree.leaves(third(bmm(jnp.matmul))),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # Anything but a plain x @ W falls through to lax.dot_general, with its options.
    y = dense_dot_general(x[0], w[0], dims, preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32


def test_dot_product_attention_equals_the_textbook_formula_to_second_order(x64):
    # The attention of BERT and EncoderBlock against plain einsums differentiated by JAX: values
    # and the second derivatives MAML takes, with key padding and a causal mask.
    q, k, v = (
        jax.random.normal(key, (2, 5, 3, 4)) for key in jax.random.split(jax.random.key(0), 3)
    )
    pad = jnp.arange(5)[None, None, :] < jnp.array([5, 2])[:, None, None]  # [batch, 1, k_len]
    causal = jnp.tril(jnp.ones((5, 5), bool))[None] & pad  # [batch, q_len, k_len]

    def reference(q, k, v, mask):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -jnp.inf), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    def second(attn, mask):  # d/d(q, k, v) of |d/d(q, k, v) sum(sin(attn))|^2
        first = jax.grad(lambda *a: jnp.sum(jnp.sin(attn(*a, mask))), argnums=(0, 1, 2))
        return jax.grad(lambda *a: sum(jnp.sum(g**2) for g in first(*a)), argnums=(0, 1, 2))

    for mask in (pad, causal):
        out = dot_product_attention(q, k, v, mask)
        assert out.shape == (2, 5, 3, 4) and out.dtype == jnp.float64
        np.testing.assert_allclose(out, reference(q, k, v, mask), rtol=1e-12, atol=1e-12)
        got, want = second(dot_product_attention, mask)(q, k, v), second(reference, mask)(q, k, v)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


def test_conv3x3_equals_lax_conv():
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    bias = jnp.arange(4.0)
    ref = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    expected = ref + bias.reshape(1, 1, 1, 4)
    np.testing.assert_allclose(conv3x3(x, kernel, bias), expected, rtol=1e-5, atol=1e-5)
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))  # Conv4's parameters are nnx.Conv's
    np.testing.assert_allclose(
        conv3x3(x, conv.kernel[...], conv.bias[...]), conv(x), rtol=1e-5, atol=1e-5
    )


def test_max_pool_equals_reduce_window():
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
    ref = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(max_pool_2x2(x), ref)


def test_conv4_meta_gradient_is_the_same_vmapped_and_sequential(x64):
    # Two inner steps, jitted: with max-pooling as a reshape + max reduction, XLA:CPU's vmapped
    # program gave a meta-gradient 22% away from the sequential one (and from PyTorch).
    apply_fn, params = mf.functionalize(Conv4(5, channels=8, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    k1, k2 = jax.random.split(jax.random.key(1))
    labels = jnp.tile(jnp.arange(5), (2, 1))
    episodes = mf.Episode(
        {"x": jax.random.uniform(k1, (2, 5, 28, 28, 1), jnp.float64), "y": labels},
        {"x": jax.random.uniform(k2, (2, 5, 28, 28, 1), jnp.float64), "y": labels},
    )

    def loss_fn(p, batch, key):
        logp = jax.nn.log_softmax(apply_fn(p, batch["x"]))
        return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], 1)), {}

    grads = {}
    for task_map in ("vmap", "scan"):
        alg = mf.maml(
            loss_fn,
            inner_tx=optax.sgd(0.4),
            outer_tx=optax.sgd(1.0),
            num_inner_steps=2,
            task_map=task_map,
        )
        grads[task_map] = jax.jit(alg.meta_grad)(params, episodes, jax.random.key(0))[0]
    for a, b in zip(jax.tree.leaves(grads["vmap"]), jax.tree.leaves(grads["scan"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def _conv4():
    return Conv4(5, channels=8, rngs=nnx.Rngs(0)), (jnp.ones((5, 28, 28, 1)),)


def _text():
    model = TextClassifier(50, 5, max_len=8, dim=16, mlp_dim=32, rngs=nnx.Rngs(0))
    tokens = jnp.arange(40).reshape(5, 8) % 50
    return model, (tokens, jnp.arange(40).reshape(5, 8) % 8 < 6)


@pytest.mark.parametrize("make", [_conv4, _text])
def test_second_order_maml_through_reference_models(make, x64):
    # Exact double-backward: the meta-gradient of a one-step adaptation matches finite differences.
    model, inputs = make()
    apply_fn, params = mf.functionalize(model)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    inputs = tuple(x.astype(jnp.float64) if x.dtype == jnp.float32 else x for x in inputs)
    labels = jnp.arange(5)

    def loss_fn(p, batch, key):
        logits = apply_fn(p, *batch)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), {}

    adapt = mf.make_adapt_fn(loss_fn, optax.sgd(0.1), 1)
    meta_loss = jax.jit(lambda p: loss_fn(adapt(p, inputs, jax.random.key(0))[0], inputs, None)[0])
    jax.test_util.check_grads(
        meta_loss, (params,), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5
    )
