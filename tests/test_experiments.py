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
    again = sinusoid.train_and_evaluate(config, str(tmp_path / "again"))
    assert again["algorithms"]["maml"]["mse"] == results["algorithms"]["maml"]["mse"]
