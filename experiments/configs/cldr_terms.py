"""CLDR term translation: names of territories, languages and currencies from a held-out
language into English, few-shot (a task is one source language; 25 languages held out).

    python -m experiments.fewshot --config experiments/configs/cldr_terms.py
    python -m experiments.fewshot --config experiments/configs/cldr_terms.py:runlocal

Real data shipped by babel (offline). A character-level encoder-decoder; chrF and BLEU
(sacrebleu) of greedy decodes on the query terms.
Expected (measured 2026-11-29, 2-core CPU): 19 min 4 s; chrF 5 / 20-shot after each method's
test-time steps on 600 episodes: MAML 11.7 / 12.3, Reptile 13.9 / 15.9, multi-task 35.6 / 37.0
(experiments/README.md).
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
