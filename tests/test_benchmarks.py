"""The benchmarks' workloads and counts; the hand-written reference steps
(metaflax.testing) compute what metaflax computes."""

import functools
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import tree_allclose

import metaflax as mf
from benchmarks import gpu, workloads
from metaflax import testing
from metaflax.models import Conv4, TextClassifier


@pytest.mark.parametrize("kind", testing.KINDS)
def test_reference_step_equals_metaflax(kind):
    w = workloads.sinusoid()
    alg = workloads.make_algorithm(kind, w, num_inner_steps=2)
    state, metrics = jax.jit(alg.step)(alg.init(w.params), w.episodes, jax.random.key(0))
    step, outer = testing.reference_step(kind, w.loss_fn, w.inner_lr, w.outer_lr, 2)
    params, _, loss = jax.jit(step)(w.params, outer.init(w.params), w.episodes, jax.random.key(0))
    assert tree_allclose(params, state.meta_params, rtol=1e-6, atol=1e-7)
    assert abs(float(loss) - float(metrics["loss"])) < 1e-6


def test_gpu_analytic_flops_match_xla_count():
    # The analytic count is matmuls only, XLA's counts every op: on the tiny model the matmuls
    # are ~97% of XLA's FLOPs, for a forward pass and for second-order MAML's 9 k F_s + 3 F_q.
    cfg = gpu.Config.tiny(layers=1)
    loss_fn, params, episodes = gpu.setup(cfg)
    query = jax.tree.map(lambda x: x[0], episodes.query)
    fwd = jax.jit(lambda p: loss_fn(p, query, None)[0]).lower(params).cost_analysis()
    assert 0.9 < gpu.forward_flops(cfg, cfg.ways * cfg.queries) / gpu.cost_flops(fwd) <= 1.0
    for k in (1, 2):
        alg = gpu.make_maml(cfg, loss_fn, k, remat=False)
        cost = jax.jit(alg.step).lower(alg.init(params), episodes, jax.random.key(0))
        assert 0.9 < gpu.model_flops(cfg, k) / gpu.cost_flops(cost.cost_analysis()) <= 1.0


def test_gpu_script_runs_tiny(tmp_path):
    cfg = gpu.Config.tiny(layers=1, meta_batch=1, seconds=0.0)
    result = gpu.run(cfg, str(tmp_path), tag="-tiny")
    (row,) = result["rows"]
    assert row["tasks_per_s"] > 0 and row["loss"] > 0 and 0.9 < row["model_over_xla_flops"] <= 1
    assert row["model_flops"] == gpu.model_flops(cfg, 1)
    saved = json.loads(
        (tmp_path / f"gpu-{gpu.device_slug(jax.devices()[0])}-tiny.json").read_text()
    )
    assert saved["rows"][0]["steps_timed"] == row["steps_timed"] >= 3
    assert result["peak_known"] == (row["mfu"] is not None)


def test_gpu_halves_the_meta_batch_until_the_step_fits(monkeypatch):
    tried = []

    def measure(cfg, k, compile_only):
        tried.append(cfg.meta_batch)
        if cfg.meta_batch > 2:
            raise gpu._DoesNotFit("too big")
        return {"meta_batch": cfg.meta_batch}

    monkeypatch.setattr(gpu, "measure", measure)
    assert gpu._fitting(gpu.Config(meta_batch=8), 1, compile_only=True) == {"meta_batch": 2}
    assert tried == [8, 4, 2]


# The PyTorch peers of benchmarks/peers.py compute metaflax's numbers: same params, same episodes,
# same losses, so their first meta-step equals metaflax's. float64 makes the comparison exact
# (~1e-15); in float32, conv4's ReLU/max-pool kinks amplify rounding (~1e-2 was seen).
PEERS = ("torch.func loop", "torch.func vmap", "higher")


def _peers(peer="torch.func loop"):
    pytest.importorskip("torch")
    if peer == "higher":
        pytest.importorskip("higher")
    from benchmarks import peers

    assert peers.PEERS == PEERS
    return peers


def _small_conv4():
    """Conv4 at 8 channels, 2 tasks: the XLA compile of the meta-step dominates the test's time."""
    w = workloads.conv4(functools.partial(Conv4, channels=8))
    return w._replace(episodes=jax.tree.map(lambda x: x[:2], w.episodes))


def _small_encoder():
    """A 1-layer TextClassifier (vocab 100, d=16, 4 heads, seq 8) on 2 padded 5-way 5-shot tasks."""
    tasks, ways, shots, seq, vocab = 2, 5, 5, 8, 100
    model = TextClassifier(
        vocab, ways, max_len=seq, dim=16, num_layers=1, mlp_dim=32, rngs=nnx.Rngs(0)
    )
    apply_fn, params = mf.functionalize(model)
    k1, k2 = jax.random.split(jax.random.key(0))
    tokens = jax.random.randint(k1, (2, tasks, ways * shots, seq), 1, vocab)
    lengths = jax.random.randint(k2, (2, tasks, ways * shots, 1), 2, seq + 1)
    mask = jnp.arange(seq).reshape(1, 1, 1, seq) < lengths
    label = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (tasks, 1))
    episodes = mf.Episode(*({"tokens": tokens[i], "mask": mask[i], "label": label} for i in (0, 1)))
    loss_fn = workloads.classification_loss_fn(apply_fn, inputs=("tokens", "mask"))
    return workloads.Workload("encoder", loss_fn, params, episodes, 0.01, 1e-3)


@functools.cache
def _metaflax_step(name, kind, num_inner_steps, dtype):
    """metaflax's first meta-step on a small workload, shared by the peers' tests."""
    peers = _peers()
    make = {
        "sinusoid": lambda: peers.first_tasks(workloads.sinusoid(), 4),
        "conv4": _small_conv4,
        "encoder": _small_encoder,
    }[name]
    with jax.enable_x64(dtype == "float64"):
        w = peers.as_dtype(make(), dtype)
        return w, peers.metaflax_meta_step(w, kind, num_inner_steps)


def _assert_parity(name, peer, kind="maml", num_inner_steps=2, dtype="float64"):
    peers = _peers(peer)
    w, ref = _metaflax_step(name, kind, num_inner_steps, dtype)
    with jax.enable_x64(dtype == "float64"):
        err = peers.parity(w, peer, kind, num_inner_steps, reference=ref)
    if dtype == "float64":
        assert err["grads"] < 1e-12 and err["loss"] < 1e-12 and err["updates"] < 1e-6, err
    else:  # Adam's first update is ~lr * sign(grad): not comparable in float32
        assert err["grads"] < 1e-5 and err["loss"] < 1e-6, err


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("peer", PEERS)
def test_peer_equals_metaflax_sinusoid(peer, dtype):
    _assert_parity("sinusoid", peer, dtype=dtype)


@pytest.mark.parametrize("kind", ["fomaml", "reptile"])
@pytest.mark.parametrize("peer", ["torch.func loop", "torch.func vmap"])
def test_torch_func_first_order_peers_equal_metaflax(peer, kind):
    _assert_parity("sinusoid", peer, kind)


# encoder and conv4 with one inner step: two double metaflax's compile time (the test's cost).
@pytest.mark.parametrize("peer", PEERS)
def test_peer_equals_metaflax_encoder(peer):
    # Layer norm, masked attention, tanh-GELU, mean-pooling; the vmap peer writes the norms out.
    _assert_parity("encoder", peer, num_inner_steps=1)


@pytest.mark.parametrize("peer", PEERS)
def test_peer_equals_metaflax_conv4(peer):
    # Batch-statistics norm, max-pool, torch's conv and the shift-matmul conv, conv biases whose
    # gradient is exactly zero (a batch norm follows), the NHWC flatten before the head.
    _assert_parity("conv4", peer, num_inner_steps=1)


def test_xla_cpu_profile_accounts_for_the_step(tmp_path):
    """The profile sees the compiled program's ops: on sinusoid their summed time is a real share
    of the step's wall time (not zero: the per-thunk trace flag reached the backend), and no
    more than two threads' worth of it."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "benchmarks.xla_cpu", "--workload", "sinusoid", "--no-sweep"]
    subprocess.run([*cmd, "--out", str(tmp_path)], check=True, capture_output=True)
    profile = json.loads((tmp_path / "xla_cpu.json").read_text())["profile"]
    op_ms = sum(profile["op_ms_per_step"].values())
    assert 0.1 * profile["wall_ms_per_step"] < op_ms < 2.0 * profile["wall_ms_per_step"]
    assert len(profile["largest_ops_ms"]) == 10


def test_decoding_baseline_decodes_what_the_cache_decodes():
    """benchmarks/decoding.py's full-recompute greedy decoder (the speed baseline) and the cached
    ``seq2seq.greedy_decode`` give the same tokens, vmapped over per-episode params."""
    import numpy as np

    from benchmarks import decoding

    decoders, params = decoding.setup(vocab=40, dim=16, layers=1, heads=2, mlp=32, tgt_len=9)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x * 1.5]), params)
    src, mask = decoding.sources(jax.random.key(0), (2, 3), 40, 7)
    cached, full = (jax.jit(jax.vmap(fn))(stacked, src, mask) for fn in decoders.values())
    assert cached.shape == (2, 3, 9) and (cached[..., 0] == decoding.BOS).all()
    np.testing.assert_array_equal(cached, full)
    assert len(np.unique(np.asarray(cached[..., 1:]))) > 3  # decoded something, not all EOS


def test_imaml_cg_error_falls_to_rounding(x64):
    """benchmarks.imaml_cg at a tiny size: the inner loop converged, and CG with as many
    iterations as parameters reaches the explicit-Hessian implicit gradient."""
    from benchmarks import imaml_cg

    result = imaml_cg.measure(hidden=3, tasks=1, lam=10.0, cg_steps=[1, 30])
    assert result["parameters"] == 22 and result["max_inner_gradient_norm"] < 1e-10
    first, last = (r["relative_error"] for r in result["rows"])
    assert last < 1e-10 < first
