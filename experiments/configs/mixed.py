"""Multi-family meta-pretraining: CLINC150 intent classification, XQuAD extractive QA and
Tatoeba translation tasks in one meta-training run, on one shared BERT encoder (one word-piece
vocabulary), each family with its own head (prototype classifier, span head, decoder). The
families take turns, one meta-batch per step; each is evaluated on its own held-out classes or
languages.

    python -m experiments.fewshot --config experiments/configs/mixed.py
    python -m experiments.fewshot --config experiments/configs/mixed.py:runlocal

Needs the CLINC150, XQuAD and Tatoeba source files (METAFLAX_DATA_DIR=../shared/data). ~1 h
50 min on 2 CPU cores. Results: experiments/README.md, section ``mixed``.
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "mixed"
    config.dataset = "mixed"
    config.tokenizer = "wordpiece"
    config.ngram = 1
    config.max_len = 32
    config.num_steps = 3000  # 1000 meta-batches per family
    config.methods = ("maml", "reptile", "multitask", "scratch")
    config.overrides.multitask.num_steps = 6750
    config.eval.shots = (1, 5)
    config.mixed = ml_collections.ConfigDict()
    config.mixed.datasets = ("clinc150", "xquad", "tatoeba")
    config.mixed.overrides = ml_collections.ConfigDict(
        {"xquad": {"max_len": 192, "languages": {"num_test": 3}}, "tatoeba": {"max_len": 48}}
    )
    config = common.parse(arg, config)
    if arg and "runlocal" in arg:
        config.mixed.overrides.tatoeba.max_len = 24
    return config
