"""HuffPost headlines, the class split of Bao et al. 2020 (20 meta-train, 5 validation, 16
meta-test classes).

    python -m experiments.fewshot --config experiments/configs/huffpost.py
    python -m experiments.fewshot --config experiments/configs/huffpost.py:runlocal

Needs the HuffPost source file (METAFLAX_DATA_DIR=../shared/data, or internet). ~55 min on 2
CPU cores. Results: experiments/README.md, section ``huffpost``.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "huffpost"
    config.dataset = "huffpost"
    config.tokenizer = "wordpiece"
    config.ngram = 1
    config.model.pool = "mean+bow"  # "mean" alone loses to the bag-of-words floor
    config.methods = ("maml", "reptile", "multitask", "scratch", "ngram_centroid", "idf_centroid")
    config.max_len = 32
    return common.parse(arg, config)
