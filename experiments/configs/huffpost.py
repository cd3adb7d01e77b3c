"""HuffPost headlines, the class split of Bao et al. 2020 (20 meta-train, 5 validation, 16
meta-test classes).

    python -m experiments.fewshot --config experiments/configs/huffpost.py
    python -m experiments.fewshot --config experiments/configs/huffpost.py:runlocal

Needs the HuffPost source file (METAFLAX_DATA_DIR=../shared/data, or internet).
Expected (measured 2026-11-29, 2-core CPU shared with other jobs): 27 min 57 s; 5-way accuracy
1 / 5-shot after each method's test-time steps: MAML 27.3 / 32.0, multi-task 26.4 / 32.8,
bag-of-words floor 25.0 / 30.7 (experiments/README.md).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "huffpost"
    config.dataset = "huffpost"
    config.tokenizer = "wordpiece"
    config.ngram = 1
    config.max_len = 32
    return common.parse(arg, config)
