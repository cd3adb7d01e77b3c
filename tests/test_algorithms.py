"""Reptile, Meta-SGD, LSLR, ANIL against hand-computed oracles; errors at the boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import sinusoid_setup, tree_allclose

import metaflax as mf


def test_reptile_matches_the_seed_formula():
    # theta <- theta + eps * sum_i (theta_i' - theta), theta_i' = k SGD steps on task i's support.
    loss_fn, params, episodes = sinusoid_setup(tasks=4)
    eps, lr, k, n = 0.1, 0.05, 3, 4
    alg = mf.reptile(
        loss_fn, inner_tx=optax.sgd(lr), outer_tx=optax.sgd(eps * n), num_inner_steps=k
    )
    state, _ = alg.step(alg.init(params), episodes, jax.random.key(0))
    total = jax.tree.map(jnp.zeros_like, params)
    for i in range(n):
        support = jax.tree.map(lambda x: x[i], episodes.support)  # noqa: B023
        theta = params
        for _ in range(k):
            g = jax.grad(lambda p: loss_fn(p, support, None)[0])(theta)  # noqa: B023
            theta = jax.tree.map(lambda a, b: a - lr * b, theta, g)
        total = jax.tree.map(lambda t, a, b: t + (a - b), total, theta, params)
    expected = jax.tree.map(lambda p, t: p + eps * t, params, total)
    assert tree_allclose(state.meta_params, expected, rtol=1e-5, atol=1e-7)


def _frozen_lr_outer(tx):
    return optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda mp: {
            "params": jax.tree.map(lambda _: "train", mp["params"]),
            "inner_lr": jax.tree.map(lambda _: "frozen", mp["inner_lr"]),
        },
    )


def test_meta_sgd_with_frozen_lrs_equals_maml():
    loss_fn, params, episodes = sinusoid_setup()
    lr = 0.05
    ref = mf.maml(loss_fn, inner_tx=optax.sgd(lr), outer_tx=optax.adam(1e-2), num_inner_steps=2)
    msgd = mf.meta_sgd(
        loss_fn, outer_tx=_frozen_lr_outer(optax.adam(1e-2)), num_inner_steps=2, init_lr=lr
    )
    s_ref, s_msgd = ref.init(params), msgd.init(params)
    for i in range(3):
        s_ref, m_ref = jax.jit(ref.step)(s_ref, episodes, jax.random.key(i))
        s_msgd, m_msgd = jax.jit(msgd.step)(s_msgd, episodes, jax.random.key(i))
        np.testing.assert_allclose(m_ref["loss"], m_msgd["loss"], rtol=1e-5)
    assert tree_allclose(s_ref.meta_params, s_msgd.meta_params["params"], rtol=1e-5, atol=1e-6)
    assert all(bool(jnp.all(x == lr)) for x in jax.tree.leaves(s_msgd.meta_params["inner_lr"]))


def test_meta_sgd_learns_per_element_learning_rates():
    loss_fn, params, episodes = sinusoid_setup()
    alg = mf.meta_sgd(loss_fn, outer_tx=optax.sgd(1e-3), num_inner_steps=1, init_lr=0.05)
    g = jax.grad(lambda m: alg.meta_loss(m, episodes, jax.random.key(0))[0])(
        alg.init(params).meta_params
    )["inner_lr"]
    kernel = g["layers"][1]["kernel"]
    assert kernel.shape == params["layers"][1]["kernel"].shape
    assert len(np.unique(np.asarray(kernel))) > kernel.size // 2  # element-wise, not shared


def test_lslr_gradients_reach_every_per_step_lr():
    loss_fn, params, episodes = sinusoid_setup()
    alg = mf.lslr(loss_fn, outer_tx=optax.adam(1e-3), num_inner_steps=3, init_lr=0.05)
    meta = alg.init(params).meta_params
    g = jax.grad(lambda m: alg.meta_loss(m, episodes, jax.random.key(0))[0])(meta)["inner_lr"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert leaf.shape == (3,), path
        assert bool(jnp.all(jnp.abs(leaf) > 0)), f"zero LR gradient at {path}: {leaf}"


def test_lslr_step_lrs_are_used_in_order():
    # With lrs (a, b) on L = 1/2 (p - c)^2: p1 = p - a (p - c); p2 = p1 - b (p1 - c).
    loss = lambda p, c, k: (0.5 * jnp.sum((p["w"] - c) ** 2), {})  # noqa: E731
    alg = mf.lslr(loss, outer_tx=optax.sgd(1.0), num_inner_steps=2, init_lr=0.1)
    meta = alg.init({"w": jnp.array(1.0)}).meta_params
    meta["inner_lr"]["w"] = jnp.array([0.5, 0.25])
    adapted, _ = alg.adapt(meta, jnp.array(3.0), jax.random.key(0))
    p1 = 1.0 - 0.5 * (1.0 - 3.0)
    np.testing.assert_allclose(adapted["w"], p1 - 0.25 * (p1 - 3.0), rtol=1e-6)
    # evaluation past the trained steps reuses the last learning rate
    adapted3, _ = alg.adapt(meta, jnp.array(3.0), jax.random.key(0), num_steps=3)
    np.testing.assert_allclose(adapted3["w"], adapted["w"] - 0.25 * (adapted["w"] - 3.0), rtol=1e-6)


def test_anil_adapts_only_the_masked_params():
    loss_fn, params, episodes = sinusoid_setup()
    head = mf.path_filter(r"\[2\]")  # the output layer of the MLP
    alg = mf.maml(
        loss_fn,
        inner_tx=optax.adam(0.1),
        outer_tx=optax.sgd(1.0),
        num_inner_steps=2,
        adapt_mask=head,
    )
    support = jax.tree.map(lambda x: x[0], episodes.support)
    adapted, _ = alg.adapt(params, support, jax.random.key(0))
    for i in (0, 1):
        assert tree_allclose(adapted["layers"][i], params["layers"][i], rtol=0, atol=0)
    assert not tree_allclose(adapted["layers"][2], params["layers"][2])
    # the meta-gradient still reaches the body (through the adapted head's dependence on it)
    g = jax.grad(lambda p: alg.meta_loss(p, episodes, jax.random.key(0))[0])(params)
    assert optax.tree.norm(g["layers"][0]) > 0


def test_nan_loss_is_detected_and_state_kept():
    loss_fn, params, episodes = sinusoid_setup()
    alg = mf.maml(loss_fn, inner_tx=optax.sgd(0.01), outer_tx=optax.adam(1e-2), num_inner_steps=1)
    state = alg.init(params)
    state, metrics = alg.step(state, episodes, jax.random.key(0))
    mf.check_finite(metrics)
    nan_y = episodes.query["y"].at[0, 0].set(jnp.nan)
    bad = episodes._replace(query={**episodes.query, "y": nan_y})
    new_state, metrics = alg.step(state, bad, jax.random.key(1))
    with pytest.raises(FloatingPointError, match="at step 1"):
        mf.check_finite(metrics)
    assert tree_allclose(new_state, state, rtol=0, atol=0)


def test_errors_name_the_fix():
    loss_fn, params, episodes = sinusoid_setup()
    kw = dict(inner_tx=optax.sgd(0.1), outer_tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match="num_inner_steps=0 must be"):
        mf.maml(loss_fn, num_inner_steps=0, **kw)
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
        mf.make_adapt_fn(loss_fn, optax.sgd(0.1), 0)
    with pytest.raises(ValueError, match="task_map='pmap'"):
        mf.maml(loss_fn, num_inner_steps=1, task_map="pmap", **kw)
    with pytest.raises(ValueError, match="init_lr"):
        mf.meta_sgd(loss_fn, outer_tx=optax.sgd(0.1), num_inner_steps=1, init_lr=-1.0)
    for factory in (mf.maml, mf.reptile):
        with pytest.raises(TypeError, match=r"inner_tx must be an optax\.GradientTransformation"):
            factory(loss_fn, inner_tx=0.1, outer_tx=optax.sgd(0.1), num_inner_steps=1)
    alg = mf.maml(loss_fn, num_inner_steps=1, **kw)
    key = jax.random.key(0)
    state = alg.init(params)
    support = jax.tree.map(lambda x: x[0], episodes.support)
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):  # not the trained 1
        alg.adapt(params, support, key, num_steps=0)
    with pytest.raises(ValueError, match="0 tasks; pass at least one episode"):
        alg.step(state, jax.tree.map(lambda x: x[:0], episodes), key)
    with pytest.raises(ValueError, match="same pytree structure"):
        alg.step(state, mf.Episode(episodes.support, {"x": episodes.query["x"]}), key)
    single = jax.tree.map(lambda x: x[0, :3], episodes)  # no task axis: leading dims 3 vs 3
    single = single._replace(query=jax.tree.map(lambda x: x[:2], single.query))
    with pytest.raises(ValueError, match="leading \\[tasks\\] axis"):
        alg.step(state, single, key)
    bad_loss = lambda p, b, k: (jnp.square(b["y"]).ravel(), {})  # noqa: E731
    alg = mf.maml(bad_loss, num_inner_steps=1, **kw)
    with pytest.raises(ValueError, match="scalar loss, got shape \\(5,\\)"):
        alg.step(alg.init(params), episodes, key)
    alg = mf.maml(lambda p, b, k: jnp.sum(b["y"]), num_inner_steps=1, **kw)
    with pytest.raises(TypeError, match="must return \\(scalar_loss, metrics_dict\\)"):
        alg.step(alg.init(params), episodes, key)
    alg = mf.maml(loss_fn, num_inner_steps=1, adapt_mask={"wrong": True}, **kw)
    with pytest.raises(ValueError, match="adapt_mask must be a pytree"):
        alg.step(alg.init(params), episodes, key)


def test_donating_the_state_keeps_the_callers_params():
    loss_fn, params, episodes = sinusoid_setup()
    for alg in (
        mf.maml(loss_fn, inner_tx=optax.sgd(0.1), outer_tx=optax.sgd(0.1), num_inner_steps=1),
        mf.reptile(loss_fn, inner_tx=optax.sgd(0.1), outer_tx=optax.sgd(0.1), num_inner_steps=1),
    ):
        step = jax.jit(alg.step, donate_argnums=0)
        state, _ = step(alg.init(params), episodes, jax.random.key(0))
        state, _ = step(state, episodes, jax.random.key(1))
        assert all(not x.is_deleted() for x in jax.tree.leaves(params))


def test_make_algorithm_is_the_factory_it_names():
    """By name, the same numbers as the factory called directly; model_params finds the model's
    parameters inside every algorithm's meta-parameters."""
    loss_fn, params, episodes = sinusoid_setup(tasks=3)
    outer, key = optax.adam(1e-2), jax.random.key(0)
    direct = {
        "maml": mf.maml(loss_fn, inner_tx=optax.sgd(0.05), outer_tx=outer, num_inner_steps=2),
        "reptile": mf.reptile(loss_fn, inner_tx=optax.sgd(0.05), outer_tx=outer, num_inner_steps=2),
        "lslr": mf.lslr(loss_fn, outer_tx=outer, init_lr=0.05, num_inner_steps=2),
    }
    for name, alg in direct.items():
        named = mf.make_algorithm(name, loss_fn, outer_tx=outer, inner_lr=0.05, num_inner_steps=2)
        a, _ = alg.step(alg.init(params), episodes, key)
        b, _ = named.step(named.init(params), episodes, key)
        assert tree_allclose(a.meta_params, b.meta_params, rtol=0, atol=0), name
        model = named.model_params(b.meta_params)
        assert jax.tree.structure(model) == jax.tree.structure(params), name
    with pytest.raises(ValueError, match="unknown algorithm 'mamll'; valid: maml"):
        mf.make_algorithm("mamll", loss_fn, outer_tx=outer, inner_lr=0.1)
    with pytest.raises(ValueError, match="pass inner_lr"):
        mf.make_algorithm("maml", loss_fn, outer_tx=outer)
    with pytest.raises(ValueError, match="pass adapt_mask"):
        mf.make_algorithm("anil", loss_fn, outer_tx=outer, inner_lr=0.1)


def test_multitask_step_is_one_outer_step_on_the_pooled_loss():
    loss_fn, params, episodes = sinusoid_setup(tasks=2)
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), episodes.support)  # pooled
    alg = mf.multitask(loss_fn, outer_tx=optax.sgd(0.1))
    state, metrics = alg.step(alg.init(params), batch, jax.random.key(0))
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert tree_allclose(state.meta_params, expected, rtol=1e-6, atol=1e-7)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    nan = jax.tree.map(lambda x: x * jnp.nan, batch)
    skipped, metrics = alg.step(state, nan, jax.random.key(0))  # a NaN step changes nothing
    assert tree_allclose(skipped.meta_params, state.meta_params, rtol=0, atol=0)
    with pytest.raises(FloatingPointError):
        mf.check_finite(metrics)


# ----------------------------------------------------------------------------------------------
# iMAML, MAML++'s schedules, the learned inner optimizer.


def _quadratic_tasks(rng, tasks, dim):
    """Per task: a support loss 0.5 (p - a)^T A (p - a) (A symmetric positive definite) and a
    query loss 0.5 |p - b|^2."""
    q = np.linalg.qr(rng.normal(size=(tasks, dim, dim)))[0]
    a_mat = q @ (rng.uniform(0.5, 2.0, (tasks, dim))[..., None] * np.swapaxes(q, 1, 2))
    support = {"A": a_mat, "a": rng.normal(size=(tasks, dim))}
    return mf.Episode(support, {"A": np.zeros_like(a_mat), "a": rng.normal(size=(tasks, dim))})


def _quadratic_loss(p, batch, key):
    del key
    d = p - batch["a"]
    return 0.5 * d @ batch["A"] @ d + 0.5 * jnp.sum(d**2) * jnp.all(batch["A"] == 0), {}


def test_imaml_equals_the_closed_form_on_quadratics(x64):
    """phi* = (A + lam I)^-1 (A a + lam theta); the meta-gradient lam (A + lam I)^-1 (phi* - b),
    averaged over tasks: CG with as many iterations as dimensions is exact."""
    rng, dim, lam = np.random.default_rng(0), 4, 0.7
    episodes = jax.tree.map(jnp.asarray, _quadratic_tasks(rng, 3, dim))
    theta = jnp.asarray(rng.normal(size=dim))
    alg = mf.imaml(
        _quadratic_loss, inner_tx=optax.sgd(0.3), outer_tx=optax.sgd(1.0), num_inner_steps=200,
        lam=lam, cg_steps=dim,
    )  # fmt: skip
    grads, metrics = jax.jit(alg.meta_grad)(theta, episodes, jax.random.key(0))
    expected, losses = [], []
    halves = (episodes.support["A"], episodes.support["a"], episodes.query["a"])
    for a_mat, a, b in zip(*halves, strict=True):
        reg = np.asarray(a_mat) + lam * np.eye(dim)
        phi = np.linalg.solve(reg, a_mat @ a + lam * theta)
        expected.append(lam * np.linalg.solve(reg, phi - b))
        losses.append(0.5 * np.sum((phi - b) ** 2))
    np.testing.assert_allclose(grads, np.mean(expected, 0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-9)


def test_imaml_matches_finite_differences_of_the_converged_solution(x64):
    """On an MLP with the inner loop run to convergence, the implicit meta-gradient equals the
    derivative of theta -> query loss(phi*(theta)) by central differences; the CG error falls
    with the number of iterations."""
    loss_fn, params, episodes = sinusoid_setup(hidden=(6,), tasks=2, dtype=jnp.float64)
    kw = dict(inner_tx=optax.sgd(0.02), outer_tx=optax.sgd(1.0), num_inner_steps=300, lam=10.0)
    key = jax.random.key(0)
    exact = mf.imaml(loss_fn, cg_steps=25, **kw)  # 19 parameters: CG is exact in 19
    grads, _ = jax.jit(exact.meta_grad)(params, episodes, key)
    direction = jax.tree.map(
        lambda p: jnp.asarray(np.random.default_rng(1).normal(size=p.shape)), params
    )
    loss = jax.jit(lambda p: exact.meta_loss(p, episodes, key)[0])
    eps = 1e-5
    shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)  # noqa: E731
    fd = (loss(shifted(1)) - loss(shifted(-1))) / (2 * eps)
    analytic = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)
    errors = []
    for steps in (1, 3, 10):
        g, _ = jax.jit(mf.imaml(loss_fn, cg_steps=steps, **kw).meta_grad)(params, episodes, key)
        errors.append(float(optax.tree.norm(jax.tree.map(jnp.subtract, g, grads))))
    assert errors[0] > errors[1] > errors[2], errors


def test_imaml_memory_does_not_grow_with_inner_steps():
    loss_fn, params, episodes = sinusoid_setup(hidden=(32, 32), tasks=2)

    def temp_bytes(num_inner_steps):
        alg = mf.imaml(
            loss_fn, inner_tx=optax.sgd(0.01), outer_tx=optax.sgd(0.1),
            num_inner_steps=num_inner_steps, lam=1.0,
        )  # fmt: skip
        compiled = jax.jit(alg.meta_grad).lower(params, episodes, jax.random.key(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(24) == temp_bytes(6)


def test_multi_step_loss_is_the_weighted_sum_of_per_step_query_losses():
    loss_fn, params, episodes = sinusoid_setup(tasks=2)
    inner, n, lr = optax.sgd(0.05), 3, 0.05
    kw = dict(inner_tx=inner, outer_tx=optax.sgd(0.1), num_inner_steps=n)
    msl, plain = mf.maml(loss_fn, multi_step_loss=10, **kw), mf.maml(loss_fn, **kw)
    key = jax.random.key(0)

    def by_hand(p, weights):  # SGD written out, the query loss after every step
        total = 0.0
        for i, task_key in enumerate(jax.random.split(key, 2)):
            inner_key, query_key = jax.random.split(task_key)
            task = jax.tree.map(lambda x: x[i], episodes)  # noqa: B023
            adapted = p
            for w, step_key in zip(weights, jax.random.split(inner_key, n), strict=True):
                g = jax.grad(lambda q: loss_fn(q, task.support, step_key)[0])(adapted)  # noqa: B023
                adapted = jax.tree.map(lambda a, b: a - lr * b, adapted, g)
                total = total + w * loss_fn(adapted, task.query, query_key)[0]
        return total / 2

    for step in (0, 4):
        weights = mf.multi_step_loss_weights(n, 10, step)
        np.testing.assert_allclose(float(jnp.sum(weights)), 1.0, rtol=1e-6)
        expected_loss, expected_grads = jax.jit(jax.value_and_grad(by_hand))(params, weights)
        (loss, _), grads = jax.value_and_grad(msl.meta_loss, has_aux=True)(
            params, episodes, key, step
        )
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
        assert tree_allclose(grads, expected_grads, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mf.multi_step_loss_weights(n, 10, 5), [0.5 / 3, 0.5 / 3, 2 / 3])
    # Past the annealing (and with no step): the last step's loss only, MAML's numbers.
    np.testing.assert_array_equal(mf.multi_step_loss_weights(n, 10, 10), [0, 0, 1])
    a = jax.jit(lambda s: msl.meta_grad(params, episodes, key, s))(10)
    b = jax.jit(plain.meta_grad)(params, episodes, key)
    assert tree_allclose(a[0], b[0], rtol=1e-5, atol=1e-7)


def test_derivative_order_annealing_switches_inside_one_program():
    """first_order_steps=2: steps 0-1 equal FOMAML's, steps 2-3 MAML's, from one jitted step
    that carries the outer optimizer's state across the switch."""
    loss_fn, params, episodes = sinusoid_setup(tasks=2)
    kw = dict(inner_tx=optax.sgd(0.05), outer_tx=optax.adam(1e-2), num_inner_steps=2)
    annealed = mf.maml(loss_fn, first_order_steps=2, **kw)
    fo, so = mf.maml(loss_fn, first_order=True, **kw), mf.maml(loss_fn, **kw)
    step = jax.jit(annealed.step)
    state = ref = annealed.init(params)
    for i in range(4):
        key = jax.random.key(i)
        state, _ = step(state, episodes, key)
        ref, _ = (fo if i < 2 else so).step(ref, episodes, key)
        assert tree_allclose(state, ref, rtol=1e-5, atol=1e-7), i
    assert step._cache_size() == 1
    with pytest.raises(ValueError, match="pass one of them"):
        mf.maml(loss_fn, first_order=True, first_order_steps=2, **kw)
    with pytest.raises(ValueError, match="multi_step_loss=-1 must be an int >= 0"):
        mf.maml(loss_fn, multi_step_loss=-1, **kw)


def test_learned_optimizer_starts_as_sgd_exactly():
    """At initialisation the learned rule is SGD at init_lr: the same adapted parameters as MAML
    with optax.sgd, bit for bit, and the same meta-gradient for the model's parameters."""
    loss_fn, params, episodes = sinusoid_setup(tasks=3)
    kw = dict(outer_tx=optax.adam(1e-2), num_inner_steps=3)
    learned = mf.learned_optimizer(loss_fn, init_lr=0.05, **kw)
    maml = mf.maml(loss_fn, inner_tx=optax.sgd(0.05), **kw)
    meta = learned.init(params).meta_params
    support = jax.tree.map(lambda x: x[0], episodes.support)
    a, _ = learned.adapt(meta, support, jax.random.key(0))
    b, _ = maml.adapt(params, support, jax.random.key(0))
    assert tree_allclose(a, b, rtol=0, atol=0)
    ga, _ = learned.meta_grad(meta, episodes, jax.random.key(1))
    gb, _ = maml.meta_grad(params, episodes, jax.random.key(1))
    assert tree_allclose(ga["params"], gb, rtol=1e-5, atol=1e-7)
    # Its own weights get gradients: the output layer first (the hidden layer's is zero at w2=0).
    assert float(optax.tree.norm(ga["optimizer"]["w2"])) > 0


def test_learned_optimizer_meta_gradient_matches_finite_differences(x64):
    loss_fn, params, episodes = sinusoid_setup(hidden=(6,), tasks=2, dtype=jnp.float64)
    alg = mf.learned_optimizer(
        loss_fn, outer_tx=optax.sgd(1.0), num_inner_steps=3, init_lr=0.05, hidden=4
    )
    meta = alg.init(params).meta_params
    rng = np.random.default_rng(0)  # move off the SGD point so every weight matters
    meta["optimizer"] = jax.tree.map(
        lambda w: w + 0.05 * jnp.asarray(rng.normal(size=w.shape)), meta["optimizer"]
    )
    key = jax.random.key(0)
    loss = jax.jit(lambda m: alg.meta_loss(m, episodes, key)[0])
    grads = jax.grad(loss)(meta)["optimizer"]
    eps = 1e-6
    for name in ("lr", "w1", "w2", "b2"):
        direction = jnp.asarray(rng.normal(size=meta["optimizer"][name].shape))

        def at(s, name=name, direction=direction):
            opt = {**meta["optimizer"], name: meta["optimizer"][name] + s * eps * direction}
            return loss({**meta, "optimizer": opt})

        fd = (at(1) - at(-1)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(grads[name], direction), fd, rtol=1e-5, err_msg=name)
