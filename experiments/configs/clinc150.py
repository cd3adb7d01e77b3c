"""CLINC150 intents, split by domain: meta-test on 3 domains (45 intents) never seen in training.

    python -m experiments.fewshot --config experiments/configs/clinc150.py
    python -m experiments.fewshot --config experiments/configs/clinc150.py:runlocal

Needs the CLINC150 source files (METAFLAX_DATA_DIR=../shared/data, or internet). ~1 h on 2
CPU cores. Results: experiments/README.md, section ``clinc150``.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "clinc150"
    config.dataset = "clinc150"
    config.tokenizer = "wordpiece"  # trained on the meta-training utterances only
    config.ngram = 1
    config.model.pool = "mean+bow"  # "mean" alone loses to the bag-of-words floor
    config.methods = ("maml", "reptile", "multitask", "scratch", "ngram_centroid", "idf_centroid")
    config.max_len = 32
    return common.parse(arg, config)
