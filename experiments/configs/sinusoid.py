"""Sinusoid regression (MAML paper, section 5.1): MAML, FOMAML, Reptile, Meta-SGD and LSLR.

~9 min on 2 CPU cores for all five algorithms:

    python -m experiments.sinusoid                                   # this config
    python -m experiments.sinusoid --config experiments/configs/sinusoid.py:runlocal

Results: experiments/README.md, section "Sinusoid regression".
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.hidden = (40, 40)
    config.meta_batch_size = 25
    config.num_support = 10  # K used in meta-training
    config.num_query = 10
    config.inner_lr = 0.01
    # Global-norm clip of inner gradients (0 disables): barely touches one-step adaptation and
    # keeps 10 test-time steps from diverging on a few 5-shot tasks (experiments/README.md).
    config.inner_clip = 100.0
    config.outer_lr = 1e-3
    config.outer_lr_decay = True  # cosine decay to 0 over num_steps
    config.num_inner_steps = 1
    config.num_steps = 100_000
    config.steps_per_chunk = 1_000  # steps per jitted scan (progress bar granularity)
    config.algorithms = ("maml", "fomaml", "reptile", "meta_sgd", "lslr")
    # Per-algorithm overrides of the fields above.
    config.overrides = ml_collections.ConfigDict(
        {name: {"num_inner_steps": 5} for name in ("reptile", "imaml", "mamlpp")}
    )
    common.add_algorithm_settings(config)  # mamlpp, imaml

    config.eval = ml_collections.ConfigDict()
    config.eval.shots = (5, 10, 20)
    config.eval.inner_steps = (1, 10)
    config.eval.curve_steps = (1, 2, 3, 5, 10)  # MSE-vs-steps plot
    # 10,000 tasks: at 1,000 the heavy-tailed 5-shot MSE's standard error is as large as the
    # gaps being compared (experiments/README.md); ~30 s of evaluation per algorithm.
    config.eval.num_tasks = 10_000
    config.eval.num_query = 100
    config.eval.seed = 1234

    if arg == "runlocal":
        config.num_steps = 300
        config.steps_per_chunk = 100
        config.eval.num_tasks = 50
        config.eval.curve_steps = (1, 10)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; valid: 'runlocal'.")
    return config
