"""CLDR language identification: meta-train on 102 languages, few-shot on 25 held-out ones.

Real data shipped by a pip dependency (babel's Unicode CLDR names of territories, languages and
currencies): runs offline on a fresh machine. The README's main job:

    python -m experiments.fewshot                          # this config
    python -m experiments.fewshot --config experiments/configs/cldr.py:runlocal

Expected (measured 2026-11-29, 2-core CPU): 8 min 20 s; 5-way accuracy on the held-out
languages, 1 / 5-shot, prototype head: MAML 68.3 / 74.2, Reptile 57.0 / 59.7, multi-task
69.2 / 77.2, trigram floor 34.7 / 50.0 (table: README.md).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "cldr"
    config.dataset = "cldr"
    return common.parse(arg, config)
