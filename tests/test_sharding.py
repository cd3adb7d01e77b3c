"""Sharded meta-steps on 8 fake CPU devices and across two real processes equal one device."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from helpers import ALGORITHMS, make_algorithm, sinusoid_setup, tree_allclose
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import metaflax as mf
from metaflax import sharding

NUM_STEPS = 3


def _run_single(alg, params, episodes):
    state, step = alg.init(params), jax.jit(alg.step)
    for i in range(NUM_STEPS):
        state, metrics = step(state, episodes, jax.random.key(i))
    return state, metrics


def _run_sharded(learner, params, episodes):
    state, episodes = learner.init(params), learner.shard_episodes(episodes)
    for i in range(NUM_STEPS):
        state, metrics = learner.step(state, episodes, jax.random.key(i))
        jax.block_until_ready(metrics["loss"])  # fake devices on 2 cores: never run far ahead
    return state, metrics


@pytest.mark.parametrize("mode", ["jit", "shard_map"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_task_sharded_step_equals_single_device(name, mode):
    assert jax.device_count() == 8, "conftest fakes 8 CPU devices"
    loss_fn, params, episodes = sinusoid_setup(tasks=8)
    alg = make_algorithm(name, loss_fn)
    ref, ref_metrics = _run_single(alg, params, episodes)
    mesh = sharding.make_mesh()
    state, metrics = _run_sharded(sharding.shard(alg, mesh, params, mode=mode), params, episodes)
    # The learned optimizer's features divide tiny gradients by their own size: the order of
    # the task sum's float32 roundings shows in its weights' Adam moments.
    rtol = 1e-3 if name == "learned_opt" else 1e-5
    assert tree_allclose(state.meta_params, ref.meta_params, rtol=1e-5, atol=1e-6)
    assert tree_allclose(state.opt_state, ref.opt_state, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.spec == P() and leaf.sharding.mesh.shape == mesh.shape


@pytest.mark.parametrize("name", [*ALGORITHMS, "protonet"])
def test_explicit_meshes_equal_single_device(name):
    """jax.make_mesh's default axes are Explicit: a meta-batch sharded over them works with
    plain jit (every algorithm), and under jax.set_mesh and through sharding.shard (MAML and
    Reptile: the differentiated and the plain task map), one step equal to one device."""
    loss_fn, params, episodes = sinusoid_setup(tasks=8)
    if name == "protonet":
        alg = mf.protonet(loss_fn, outer_tx=optax.adam(1e-2), task_init=lambda p, s: p)
    else:
        alg = make_algorithm(name, loss_fn)
    key = jax.random.key(0)
    ref, _ = jax.jit(alg.step)(alg.init(params), episodes, key)
    mesh = jax.make_mesh((8, 1), (sharding.TASKS, sharding.MODEL))
    assert set(mesh.axis_types) == {AxisType.Explicit}
    placed = jax.device_put(episodes, NamedSharding(mesh, P(sharding.TASKS)))
    states = [jax.jit(alg.step)(alg.init(params), placed, key)[0]]
    if name in ("maml", "reptile"):
        with jax.set_mesh(mesh):
            states.append(jax.jit(alg.step)(alg.init(params), placed, key)[0])
        learner = sharding.shard(alg, mesh, params)
        states.append(learner.step(learner.init(params), learner.shard_episodes(episodes), key)[0])
    for state in states:
        assert tree_allclose(state.meta_params, ref.meta_params, rtol=1e-5, atol=1e-6)
    if name == "maml":  # tasks one after another cannot run over a sharded task axis
        alg = mf.maml(
            loss_fn, inner_tx=optax.sgd(0.1), outer_tx=optax.sgd(0.1), num_inner_steps=1,
            task_map="scan",
        )  # fmt: skip
        with pytest.raises(ValueError, match=r"task_map='scan' .* use task_map='vmap'"):
            jax.jit(alg.step)(alg.init(params), placed, key)


def test_shard_map_without_the_varying_cast_is_wrong():
    # The pitfall the cast prevents: shard_map sums the inner gradient of replicated params.
    loss_fn, params, episodes = sinusoid_setup(tasks=8)
    alg = make_algorithm("maml", loss_fn)
    mesh = sharding.make_mesh()
    ref, _ = alg.meta_grad(params, episodes, jax.random.split(jax.random.key(0), 8))

    def naive(params, episodes, keys):
        grads, _ = alg.meta_grad(params, episodes, keys)
        return jax.lax.pmean(grads, sharding.TASKS)

    wrong = jax.jit(
        jax.shard_map(naive, mesh=mesh, in_specs=(P(), P("tasks"), P("tasks")), out_specs=P())
    )(params, episodes, jax.random.split(jax.random.key(0), 8))
    assert not tree_allclose(wrong, ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["maml", "meta_sgd", "reptile"])
def test_model_sharded_step_equals_unsharded(name):
    loss_fn, params, episodes = sinusoid_setup(hidden=(16, 16), tasks=4)
    alg = make_algorithm(name, loss_fn)
    ref, _ = _run_single(alg, params, episodes)
    mesh = sharding.make_mesh(tasks=2, model=4)
    learner = sharding.shard(alg, mesh, params)
    state, _ = _run_sharded(learner, params, episodes)
    assert tree_allclose(state.meta_params, ref.meta_params, rtol=1e-5, atol=1e-6)
    kernel = (
        state.meta_params["layers"][1]["kernel"]
        if name != "meta_sgd"
        else (state.meta_params["params"]["layers"][1]["kernel"])
    )
    assert kernel.sharding.spec == P("model")  # [16, 16]: split along dim 0 over 'model'
    assert kernel.addressable_shards[0].data.shape == (4, 16)
    bias = jax.tree.leaves(state.meta_params)[0]
    assert bias.sharding.spec == P()


def test_init_from_abstract_params_is_directly_sharded():
    loss_fn, params, _ = sinusoid_setup(hidden=(16, 16), tasks=4)
    alg = make_algorithm("maml", loss_fn)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    mesh = sharding.make_mesh(tasks=2, model=4)
    learner = sharding.shard(alg, mesh, abstract)

    @jax.jit
    def make_params(key):  # stands in for a large model's initialiser
        return jax.tree.map(lambda a: jax.random.normal(key, a.shape, a.dtype), abstract)

    state = jax.jit(lambda k: learner.init(make_params(k)))(jax.random.key(0))
    assert state.meta_params["layers"][1]["kernel"].sharding.spec == P("model")
    mu = state.opt_state[0].mu["layers"][1]["kernel"]  # Adam moments follow their params
    assert mu.sharding.spec == P("model")


def test_errors():
    loss_fn, params, episodes = sinusoid_setup(tasks=6)
    alg = make_algorithm("maml", loss_fn)
    with pytest.raises(ValueError, match="needs 16 devices, but 8 are available"):
        sharding.make_mesh(tasks=4, model=4)
    learner = sharding.shard(alg, sharding.make_mesh(tasks=4), params)
    with pytest.raises(ValueError, match="meta_batch_size=6 must be divisible by the 4 devices"):
        learner.shard_episodes(episodes)
    with pytest.raises(ValueError, match="meta_batch_size=6 must be divisible"):
        learner.step(learner.init(params), episodes, jax.random.key(0))
    bad_param = r"parameter .*\['layers'\]\[0\]\['kernel'\] has shape \(1, 8\)"
    with pytest.raises(ValueError, match=bad_param):
        sharding.shard(alg, sharding.make_mesh(tasks=2, model=3), params)
    with pytest.raises(ValueError, match="use mode='jit'"):
        sharding.shard(alg, sharding.make_mesh(tasks=2, model=4), params, mode="shard_map")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_two_processes_equal_one(name, tmp_path):
    port, out = _free_port(), tmp_path / "result.npz"
    worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(port), name, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    loss_fn, params, episodes = sinusoid_setup(tasks=8)
    ref, ref_metrics = _run_single(make_algorithm(name, loss_fn), params, episodes)
    result = np.load(out)
    np.testing.assert_allclose(result["loss"], ref_metrics["loss"], rtol=1e-5)
    for i, leaf in enumerate(jax.tree.leaves(ref.meta_params)):
        np.testing.assert_allclose(result[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)
