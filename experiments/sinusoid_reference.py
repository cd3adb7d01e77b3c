"""The sinusoid MAML bar, checked against the hand-written jax+optax MAML it came from.

    python -m experiments.sinusoid_reference                     # seeds 0-4, 70,000 steps
    python -m experiments.sinusoid_reference --seeds 0 --steps 2000

For each seed, metaflax's ``mf.maml`` (via :mod:`experiments.sinusoid`) and the hand-written
step of :func:`metaflax.testing.reference_step` (a Python ``jax.grad`` + SGD inner step,
``vmap`` over tasks, ``optax.adam`` outside) are meta-trained in the issue's setting (K=10,
meta-batch 25, inner SGD 0.01 without clipping, constant outer Adam 1e-3) from the same
initialisation on the same task stream, then scored with :func:`experiments.sinusoid.evaluate`
(the sinusoid config's 10,000 fresh tasks, one SGD step).
Prints one row per seed and writes ``sinusoid_reference.json`` to ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import metaflax as mf
from experiments import sinusoid
from experiments.configs.common import with_fields
from experiments.configs.sinusoid import get_config
from metaflax.models import MLP
from metaflax.tasks import mse_loss_fn
from metaflax.testing import reference_step

SHOTS = (5, 10, 20)
NAMES = ("metaflax", "reference")


def reference_algorithm(maml: mf.MetaAlgorithm, loss_fn, config) -> mf.MetaAlgorithm:
    """``maml`` with ``init`` / ``step`` (what ``sinusoid.meta_train`` calls) replaced by the
    hand-written step."""
    step_fn, outer = reference_step(
        "maml", loss_fn, config.inner_lr, config.outer_lr, config.num_inner_steps
    )

    def init(params):
        return mf.MetaState(params, outer.init(params), jnp.zeros((), jnp.int32))

    def step(state, episodes, key):
        params, opt_state, loss = step_fn(state.meta_params, state.opt_state, episodes, key)
        metrics = {"loss": loss}  # what mf.check_finite needs
        return mf.MetaState(params, opt_state, state.step + 1), metrics

    return maml._replace(init=init, step=step)


def run(seeds, steps: int) -> list[dict]:
    config = with_fields(get_config(), num_steps=steps, outer_lr_decay=False, inner_clip=0.0)
    rows = []
    for seed in seeds:
        apply_fn, params = mf.functionalize(MLP([1, *config.hidden, 1], rngs=nnx.Rngs(seed)))
        loss_fn = mse_loss_fn(apply_fn)
        maml = sinusoid.make_algorithm("maml", loss_fn, config)
        reference = reference_algorithm(maml, loss_fn, config)
        row = {"seed": seed}
        for name, alg in zip(NAMES, (maml, reference), strict=True):
            state, _, seconds = sinusoid.meta_train(
                alg, params, config, jax.random.key(seed), desc=f"{name}, seed {seed}"
            )
            row[name] = {
                f"{k}-shot": float(
                    np.mean(sinusoid.evaluate(maml, state.meta_params, loss_fn, config, k, 1))
                )
                for k in SHOTS
            }
            row[name]["train_seconds"] = round(seconds, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=70_000)
    parser.add_argument("--workdir", default="workdirs/sinusoid_reference")
    args = parser.parse_args()
    rows = run([int(s) for s in args.seeds.split(",")], args.steps)
    print(f"| seed | metaflax {' / '.join(f'{k}-shot' for k in SHOTS)} | reference |")
    print("|---|---|---|")
    for row in rows:
        cells = [" / ".join(f"{row[n][f'{k}-shot']:.3f}" for k in SHOTS) for n in NAMES]
        print(f"| {row['seed']} | {cells[0]} | {cells[1]} |")
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "sinusoid_reference.json"), "w") as f:
        json.dump({"steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
