"""Tatoeba sentence translation into English from held-out languages, few-shot.

    python -m experiments.fewshot --config experiments/configs/tatoeba.py
    python -m experiments.fewshot --config experiments/configs/tatoeba.py:runlocal

A task is one source language (112 with English pairs; 25 held out). Character-level
encoder-decoder; chrF and BLEU (sacrebleu). Needs the Tatoeba source files
(METAFLAX_DATA_DIR=../shared/data, or internet). ~32 min on 2 CPU cores.
Results: experiments/README.md, section ``tatoeba``.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "tatoeba"
    config.dataset = "tatoeba"
    config.max_len = 48  # characters; longer sentences are truncated
    config.shots = 10
    config.queries = 10
    config.eval.shots = (5, 20)
    config.eval.queries = 10
    config.methods = ("maml", "reptile", "multitask", "scratch")
    # CPU-sized: a second-order MAML step over 4 tasks x 20 sentence pairs takes ~1 s on 2 cores.
    config.num_steps = 200
    config.warmup_steps = 20
    config.overrides.multitask.num_steps = 450
    return common.parse(arg, config)
