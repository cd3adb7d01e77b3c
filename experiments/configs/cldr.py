"""CLDR language identification: meta-train on 102 languages, few-shot on 25 held-out ones.

Real data shipped by a pip dependency (babel's Unicode CLDR names of territories, languages and
currencies): runs offline on a fresh machine. The README's main job:

    python -m experiments.fewshot                          # this config
    python -m experiments.fewshot --config experiments/configs/cldr.py:runlocal

Expected result and wall time: see experiments/README.md (filled from a real run).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "cldr"
    config.dataset = "cldr"
    return common.parse(arg, config)
