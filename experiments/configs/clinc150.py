"""CLINC150 intents, split by domain: meta-test on 3 domains (45 intents) never seen in training.

    python -m experiments.fewshot --config experiments/configs/clinc150.py
    python -m experiments.fewshot --config experiments/configs/clinc150.py:runlocal

Needs the CLINC150 source files (METAFLAX_DATA_DIR=../shared/data, or internet).
Expected (measured 2026-11-29, 2-core CPU shared with other jobs): 31 min 38 s; 5-way accuracy
1 / 5-shot after each method's test-time steps: MAML 49.8 / 51.1 (62.1 at 5-shot before its
step), multi-task 50.9 / 65.8, bag-of-words floor 72.3 / 92.6 (experiments/README.md).
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
