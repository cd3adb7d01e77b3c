"""HuffPost headlines, the class split of Bao et al. 2020 (20 meta-train, 16 meta-test classes).

    python -m experiments.fewshot --config experiments/configs/huffpost.py
    python -m experiments.fewshot --config experiments/configs/huffpost.py:runlocal

Needs the HuffPost source file (METAFLAX_DATA_DIR=../shared/data, or internet).
Expected (measured 2026-11-29, 2-core CPU, with 3,600 multi-task steps): 15 min 7 s;
5-way accuracy 1 / 5-shot: MAML 27.3 / 33.8, multi-task 26.8 / 33.1, bag-of-words floor
25.0 / 30.7 (experiments/README.md).
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
