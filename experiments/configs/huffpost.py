"""HuffPost headlines, the class split of Bao et al. 2020 (20 meta-train, 5 validation, 16
meta-test classes).

    python -m experiments.fewshot --config experiments/configs/huffpost.py
    python -m experiments.fewshot --config experiments/configs/huffpost.py:runlocal

Needs the HuffPost source file (METAFLAX_DATA_DIR=../shared/data, or internet).
Expected (measured 2026-11-30, 2-core CPU shared with two other runs; experiments/README.md):
55 min; 5-way accuracy 1 / 5-shot after each method's test-time steps: MAML 29.2 / 37.7,
Reptile 28.9 / 39.1, multi-task 27.4 / 37.3, untrained 25.1 / 31.1, bag-of-words floor 25.1 /
30.7, tf-idf floor 26.6 / 36.8. With model.pool="mean": MAML 27.3 / 32.0.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "huffpost"
    config.dataset = "huffpost"
    config.tokenizer = "wordpiece"
    config.ngram = 1
    config.model.pool = "mean+bow"  # "mean" alone loses to the bag-of-words floor (README)
    config.methods = ("maml", "reptile", "multitask", "scratch", "ngram_centroid", "idf_centroid")
    config.max_len = 32
    return common.parse(arg, config)
