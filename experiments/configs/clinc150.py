"""CLINC150 intents, split by domain: meta-test on 3 domains (45 intents) never seen in training.

    python -m experiments.fewshot --config experiments/configs/clinc150.py
    python -m experiments.fewshot --config experiments/configs/clinc150.py:runlocal

Needs the CLINC150 source files (METAFLAX_DATA_DIR=../shared/data, or internet).
Expected (measured 2026-11-29, 2-core CPU, with 3,600 multi-task steps): 19 min 45 s;
5-way accuracy 1 / 5-shot: MAML 46.4 / 62.2, multi-task 53.9 / 69.6, bag-of-words floor
71.0 / 92.2 (experiments/README.md).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "clinc150"
    config.dataset = "clinc150"
    config.tokenizer = "wordpiece"  # trained on the meta-training utterances only
    config.ngram = 1
    config.max_len = 32
    return common.parse(arg, config)
