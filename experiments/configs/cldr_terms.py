"""CLDR term translation: names of territories, languages and currencies from a held-out
language into English, few-shot (a task is one source language; 25 languages held out).

    python -m experiments.fewshot --config experiments/configs/cldr_terms.py
    python -m experiments.fewshot --config experiments/configs/cldr_terms.py:runlocal

Real data shipped by babel (offline). A character-level encoder-decoder; chrF and BLEU
(sacrebleu) of greedy decodes on the query terms. ~19 min on 2 CPU cores.
Results: experiments/README.md, section ``cldr_terms``.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "cldr_terms"
    config.dataset = "cldr_terms"
    config.max_len = 24
    config.shots = 10
    config.queries = 10
    config.eval.shots = (5, 20)
    config.eval.queries = 10
    config.methods = ("maml", "reptile", "multitask", "scratch")
    config.num_steps = 600
    config.overrides.multitask.num_steps = 1350
    return common.parse(arg, config)
