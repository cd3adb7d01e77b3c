"""The inner loop and the MAML meta-gradient against closed forms and finite differences."""

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from helpers import sinusoid_setup, tree_allclose

import metaflax as mf


def quadratic_loss(p, c, key):
    del key
    return 0.5 * jnp.sum((p - c) ** 2), {}


def test_maml_quadratic_closed_form():
    # L(p; c) = 1/2 (p - c)^2, one SGD step of size a: d/dp L(p') = (1 - a)^2 (p - c).
    a = 0.3
    alg = mf.maml(quadratic_loss, inner_tx=optax.sgd(a), outer_tx=optax.sgd(1.0), num_inner_steps=1)
    p = jnp.array([0.5, -2.0, 3.0])
    c = jnp.array([[1.0, 1.0, -1.0], [2.0, 0.0, 0.5]])  # [tasks, dim]
    grads = jax.grad(lambda m: alg.meta_loss(m, mf.Episode(c, c), jax.random.key(0))[0])(p)
    expected = jnp.mean((1 - a) ** 2 * (p[None] - c), axis=0)
    np.testing.assert_allclose(grads, expected, rtol=1e-6)


def test_maml_quadratic_two_steps_distinct_query():
    # Two SGD steps on c_s, query on c_q: p'' - c_s = (1-a)^2 (p - c_s); grad = (1-a)^2 (p'' - c_q).
    a, p, cs, cq = 0.2, jnp.array(1.5), jnp.array([[-1.0]]), jnp.array([[2.0]])
    alg = mf.maml(quadratic_loss, inner_tx=optax.sgd(a), outer_tx=optax.sgd(1.0), num_inner_steps=2)
    g = jax.grad(lambda m: alg.meta_loss(m, mf.Episode(cs, cq), jax.random.key(0))[0])(p)
    p2 = cs[0, 0] + (1 - a) ** 2 * (p - cs[0, 0])
    np.testing.assert_allclose(g, (1 - a) ** 2 * (p2 - cq[0, 0]), rtol=1e-6)


def test_second_order_through_adam_matches_finite_differences(x64):
    loss_fn, params, episodes = sinusoid_setup(dtype=jnp.float64)
    # Adam's state is created inside adapt and differentiated. eps_root > 0 keeps sqrt(v)
    # differentiable where a gradient element is exactly 0 (dead ReLUs): see the next test.
    inner_tx = optax.adam(0.05, eps_root=1e-8)
    alg = mf.maml(loss_fn, inner_tx=inner_tx, outer_tx=optax.sgd(1.0), num_inner_steps=3)
    f = lambda p: alg.meta_loss(p, episodes, jax.random.key(0))[0]  # noqa: E731
    jax.test_util.check_grads(f, (params,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
    # and the same through a clipping chain
    clipped = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1))
    alg = mf.maml(loss_fn, inner_tx=clipped, outer_tx=optax.sgd(1.0), num_inner_steps=2)
    f = lambda p: alg.meta_loss(p, episodes, jax.random.key(0))[0]  # noqa: E731
    jax.test_util.check_grads(f, (params,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_nan_meta_gradient_through_plain_adam_is_reported():
    # optax.adam(eps_root=0) has an infinite derivative of sqrt(v) at v = 0: MAML through it
    # gives NaN meta-gradients. The step refuses the update and check_finite names the fix.
    loss_fn, params, episodes = sinusoid_setup()
    alg = mf.maml(loss_fn, inner_tx=optax.adam(0.05), outer_tx=optax.sgd(1.0), num_inner_steps=2)
    state = alg.init(params)
    new_state, metrics = jax.jit(alg.step)(state, episodes, jax.random.key(0))
    assert bool(jnp.isfinite(metrics["loss"])) and not bool(jnp.isfinite(metrics["grad_norm"]))
    with pytest.raises(FloatingPointError, match="eps_root"):
        mf.check_finite(metrics)
    assert tree_allclose(new_state, state, rtol=0, atol=0)


def test_first_order_is_query_gradient_at_adapted_params():
    loss_fn, params, episodes = sinusoid_setup()
    kw = dict(inner_tx=optax.sgd(0.05), outer_tx=optax.sgd(1.0), num_inner_steps=2)
    key = jax.random.key(3)
    fo = mf.maml(loss_fn, first_order=True, **kw)
    so = mf.maml(loss_fn, **kw)
    g_fo = jax.grad(lambda p: fo.meta_loss(p, episodes, key)[0])(params)
    g_so = jax.grad(lambda p: so.meta_loss(p, episodes, key)[0])(params)

    # Oracle: adapt each task with the same keys, then the plain query gradient at adapted params.
    task_keys = jax.random.split(key, 3)
    oracle = []
    for i in range(3):
        ep = jax.tree.map(lambda x: x[i], episodes)  # noqa: B023
        inner_key, query_key = jax.random.split(task_keys[i])
        adapted, _ = fo.adapt(params, ep.support, inner_key)
        oracle.append(jax.grad(lambda p: loss_fn(p, ep.query, query_key)[0])(adapted))  # noqa: B023
    oracle = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), 0), *oracle)
    assert tree_allclose(g_fo, oracle, rtol=1e-5, atol=1e-6)
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, g_fo, g_so))
    assert diff > 1e-3 * optax.tree.norm(g_so)


def test_adapt_is_plain_sgd_by_hand():
    loss_fn, params, episodes = sinusoid_setup()
    support = jax.tree.map(lambda x: x[0], episodes.support)
    adapt = mf.make_adapt_fn(loss_fn, optax.sgd(0.1), num_steps=3)
    adapted, losses = adapt(params, support, jax.random.key(0))
    p = params
    for i in range(3):
        loss, g = jax.value_and_grad(lambda q: loss_fn(q, support, None)[0])(p)
        np.testing.assert_allclose(losses[i], loss, rtol=1e-6)
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
    assert tree_allclose(adapted, p)


# remat=2: two segments of 2 steps; remat=3: one segment of 3 and a checkpointed tail step
@pytest.mark.parametrize(
    "dtype, remat",
    [(jnp.float32, True), (jnp.float64, True), (jnp.float64, 2), (jnp.float32, 3)],
)
def test_remat_gives_same_meta_gradients(dtype, remat):
    with jax.enable_x64(dtype == jnp.float64):
        loss_fn, params, episodes = sinusoid_setup(dtype=dtype)
        kw = dict(
            inner_tx=optax.adam(0.01, eps_root=1e-8), outer_tx=optax.sgd(1.0), num_inner_steps=4
        )
        algs = (mf.maml(loss_fn, **kw), mf.maml(loss_fn, remat=remat, **kw))
        (_, ref), ref_grads = jax.jit(jax.value_and_grad(algs[0].meta_loss, has_aux=True))(
            params, episodes, jax.random.key(0)
        )
        (_, out), out_grads = jax.jit(jax.value_and_grad(algs[1].meta_loss, has_aux=True))(
            params, episodes, jax.random.key(0)
        )
        # float32 recomputation reorders a few sums; in float64 they agree to 1e-6 and beyond
        tol = 1e-6 if dtype == jnp.float64 else 1e-5
        assert tree_allclose(ref_grads, out_grads, rtol=tol, atol=1e-6)
        np.testing.assert_allclose(ref["inner_losses"], out["inner_losses"], rtol=tol)


def test_remat_must_be_bool_or_segment_length():
    loss_fn, _, _ = sinusoid_setup()
    with pytest.raises(ValueError, match="int c >= 2"):
        mf.make_adapt_fn(loss_fn, optax.sgd(0.1), num_steps=4, remat=-1)


@pytest.mark.parametrize("num_tasks", [1, 5, 8])
def test_broadcast_to_tasks_differentiates_like_a_closure(x64, num_tasks):
    # vmap over the broadcast copies must give the same values, gradients and second
    # derivatives as closing over the tree (whose gradient XLA sums with a reduce).
    tree = {"w": jax.random.normal(jax.random.key(0), (3, 2)), "b": jnp.arange(2.0)}
    xs = jax.random.normal(jax.random.key(1), (num_tasks, 4, 3))

    def per_task(p, x):
        return jnp.sum(jnp.sin(x @ p["w"] + p["b"][None]) ** 2)

    def closed(p):
        return jnp.sum(jax.vmap(lambda x: per_task(p, x))(xs))

    def broadcast(p):
        return jnp.sum(jax.vmap(per_task)(mf.broadcast_to_tasks(p, num_tasks), xs))

    np.testing.assert_allclose(broadcast(tree), closed(tree), rtol=1e-14)
    assert tree_allclose(jax.grad(broadcast)(tree), jax.grad(closed)(tree), rtol=1e-13)
    v = jax.tree.map(jnp.ones_like, tree)
    hvp = lambda f: jax.grad(lambda p: optax.tree.vdot(jax.grad(f)(p), v))(tree)  # noqa: E731
    assert tree_allclose(hvp(broadcast), hvp(closed), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("task_map", ["scan", 2])
def test_task_map_variants_agree(task_map):
    loss_fn, params, episodes = sinusoid_setup(tasks=4)
    kw = dict(inner_tx=optax.sgd(0.05), outer_tx=optax.adam(1e-2), num_inner_steps=2)
    ref = mf.maml(loss_fn, **kw)
    alt = mf.maml(loss_fn, task_map=task_map, **kw)
    key = jax.random.key(1)
    s_ref, m_ref = jax.jit(ref.step)(ref.init(params), episodes, key)
    s_alt, m_alt = jax.jit(alt.step)(alt.init(params), episodes, key)
    np.testing.assert_allclose(m_ref["loss"], m_alt["loss"], rtol=1e-6)
    assert tree_allclose(s_ref.meta_params, s_alt.meta_params, rtol=1e-5, atol=1e-6)


def test_sequential_task_maps_keep_one_task_of_intermediates():
    """Differentiated, ``task_map="scan"`` needs far less scratch memory than ``vmap`` (the
    per-task function is checkpointed): XLA's compiled memory analysis of the meta-gradient."""
    loss_fn, params, episodes = sinusoid_setup(tasks=32)
    kw = dict(inner_tx=optax.sgd(0.05), outer_tx=optax.adam(1e-2), num_inner_steps=3)

    def temp_bytes(task_map):
        alg = mf.maml(loss_fn, task_map=task_map, **kw)
        lowered = jax.jit(alg.meta_grad).lower(params, episodes, jax.random.key(0))
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("scan") < temp_bytes("vmap") / 4


def test_step_is_deterministic_and_traces_once():
    loss_fn, params, episodes = sinusoid_setup()
    alg = mf.maml(loss_fn, inner_tx=optax.sgd(0.05), outer_tx=optax.adam(1e-2), num_inner_steps=2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, episodes, key):
        return alg.step(state, episodes, key)

    def run():
        state = alg.init(params)
        for i in range(3):
            state, metrics = step(state, episodes, jax.random.key(i))
        return state, metrics

    a, b = run(), run()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(a[0].step) == 3


def test_mixed_precision_keeps_float32_state_and_meta_gradient_close():
    loss_fn, params, episodes = sinusoid_setup(hidden=(32, 32), tasks=4, shots=10)
    seen = []

    def spy(p, batch, key):  # records the dtypes the model computes in
        seen.append((p["layers"][0]["kernel"].dtype, batch["x"].dtype))
        return loss_fn(p, batch, key)

    kw = dict(inner_tx=optax.sgd(0.05), outer_tx=optax.adam(1e-3), num_inner_steps=2)
    ref, bf16 = mf.maml(loss_fn, **kw), mf.maml(mf.mixed_precision(spy), **kw)
    key = jax.random.key(0)
    g32, _ = jax.jit(ref.meta_grad)(params, episodes, key)
    g16, metrics = jax.jit(bf16.meta_grad)(params, episodes, key)
    assert set(seen) == {(jnp.dtype(jnp.bfloat16),) * 2}
    assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32
    state, _ = jax.jit(bf16.step)(bf16.init(params), episodes, key)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.float32)}
    # bf16 keeps 8 mantissa bits (relative rounding 2**-9): the meta-gradient is close to
    # float32's, but not equal to it (the arithmetic really ran in bf16)
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, g16, g32)) / optax.tree.norm(g32)
    cos = optax.tree.vdot(g16, g32) / (optax.tree.norm(g16) * optax.tree.norm(g32))
    assert 1e-4 < diff < 0.05 and cos > 0.999


def test_mixed_precision_passes_integer_leaves_and_rejects_int_dtype():
    loss_fn = mf.mixed_precision(
        lambda p, b, k: (jnp.sum(p * b["x"][b["i"], 0]), {"n": jnp.sum(b["i"])})
    )
    loss, metrics = loss_fn(jnp.ones(2), {"x": jnp.ones((3, 2)), "i": jnp.array([0, 2])}, None)
    assert loss.dtype == jnp.float32 and metrics["n"].dtype == jnp.int32
    with pytest.raises(ValueError, match="floating dtype"):
        mf.mixed_precision(loss_fn, jnp.int8)
