"""CLDR language identification: meta-train on 92 languages, few-shot on 25 held-out ones (10
more validation languages choose the baselines' test-time learning rate).

Real data shipped by a pip dependency (babel's Unicode CLDR names of territories, languages and
currencies): runs offline on a fresh machine. The README's main job, ~11 min on 2 CPU cores:

    python -m experiments.fewshot                          # this config
    python -m experiments.fewshot --config experiments/configs/cldr.py:runlocal

Results: experiments/README.md, section ``cldr``.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "cldr"
    config.dataset = "cldr"
    # the mean, next to a bag of hashed character 1-3-grams at equal initial weight: with "mean"
    # alone Reptile loses to the n-gram floor, and the validation languages prefer weight 1 to
    # the word-piece configs' 4 (experiments/README.md, cldr)
    config.model.pool = "mean+bow"
    config.model.bow_scale = 1.0
    # equal compute: the bag makes a pooled step dearer than in the word-piece configs, so
    # 2,450 steps (not 2,700) take MAML's wall time here (experiments/README.md, cldr)
    config.overrides.multitask.num_steps = 2450
    return common.parse(arg, config)
