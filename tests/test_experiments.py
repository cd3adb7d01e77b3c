"""The sinusoid experiment end to end at smoke size (flax-examples style train_test)."""

import json

from flax import nnx

import metaflax as mf
from experiments import sinusoid
from experiments.configs.sinusoid import get_config
from metaflax.models import MLP
from metaflax.tasks import mse_loss_fn


def test_sinusoid_train_and_evaluate(tmp_path):
    config = get_config("runlocal")
    config.algorithms = ("maml", "lslr")
    config.num_steps = 200
    config.eval.shots = (10,)  # each (shots, steps) evaluation compiles its own program
    results = sinusoid.train_and_evaluate(config, str(tmp_path))

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["algorithms"].keys() == {"maml", "lslr"}
    assert (tmp_path / "sinusoid.png").stat().st_size > 10_000
    assert "| maml |" in (tmp_path / "results.md").read_text()
    # Meta-training helped: the same 10-shot evaluation tasks from the untrained initialisation
    # (meta_params = init params, MAML adaptation) have a higher MSE than after meta-training.
    apply_fn, params = mf.functionalize(MLP([1, 40, 40, 1], rngs=nnx.Rngs(config.seed)))
    untrained = sinusoid.make_algorithm("maml", mse_loss_fn(apply_fn), config)
    before = sinusoid.evaluate(untrained, params, mse_loss_fn(apply_fn), config, 10, 1).mean()
    after = results["algorithms"]["maml"]["mse"]["10-shot/1-step"]["mean"]
    assert after < 0.8 * before
    # Determinism: the same config and seed give the same numbers, bit for bit.
    config.algorithms = ("maml",)
    again = sinusoid.train_and_evaluate(config, str(tmp_path / "again"))
    assert again["algorithms"]["maml"]["mse"] == results["algorithms"]["maml"]["mse"]


def test_sinusoid_maml_trains_exactly_like_the_hand_written_reference():
    """From the same initialisation on the same task stream, 100 meta-steps of ``mf.maml`` and
    of the hand-written jax+optax step (``experiments.sinusoid_reference``) end at the same
    parameters: the 5-shot bar compares one algorithm, not two implementations."""
    import jax
    import numpy as np

    from experiments.configs.common import with_fields
    from experiments.sinusoid_reference import reference_algorithm

    config = with_fields(
        get_config(), num_steps=100, steps_per_chunk=50, outer_lr_decay=False, inner_clip=0.0
    )
    apply_fn, params = mf.functionalize(MLP([1, 40, 40, 1], rngs=nnx.Rngs(0)))
    loss_fn = mse_loss_fn(apply_fn)
    maml = sinusoid.make_algorithm("maml", loss_fn, config)
    ours, ref = (
        sinusoid.meta_train(alg, params, config, jax.random.key(0), desc)[0].meta_params
        for alg, desc in ((maml, "metaflax"), (reference_algorithm(maml, loss_fn, config), "ref"))
    )
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    moved = np.abs(ours["layers"][0]["kernel"] - params["layers"][0]["kernel"]).max()
    assert moved > 1e-2  # the 100 steps did train


def test_run_tpu_passes_every_argument_through_unchanged(tmp_path):
    """The remote command gets each argument as one word: spaces, ';' and '$' stay inside it."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = tmp_path / "gcloud.args"
    fake = tmp_path / "gcloud"
    fake.write_text(f'#!/bin/bash\nfor a in "$@"; do printf "%s\\0" "$a"; done >> {log}\n')
    fake.chmod(0o755)
    args = ["benchmarks.scaling", "--note=a b; rm -rf ~", "$HOME", "it's"]
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    subprocess.run(
        ["bash", os.path.join(root, "experiments", "run_tpu.sh"), "tpu", "zone", *args],
        env=env, check=True, cwd=tmp_path,
    )  # fmt: skip
    (command,) = [a for a in log.read_text().split("\0") if a.startswith("--command=")]
    launch = command.strip().splitlines()[-1]  # METAFLAX_DISTRIBUTED=1 python -m ...
    shown = subprocess.run(
        ["bash", "-c", 'python() { printf "%s\\0" "$@"; }; ' + launch],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert shown.split("\0")[:-1] == ["-m", *args]
