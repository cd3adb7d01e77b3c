"""FewRel relations, cross-domain: meta-train on Wikipedia relations, meta-test on NYT ones.

    python -m experiments.fewshot --config experiments/configs/fewrel.py
    python -m experiments.fewshot --config experiments/configs/fewrel.py:runlocal

Entities are marked in the text ([E1] head [/E1], [E2] tail [/E2]). Needs the FewRel source
files (METAFLAX_DATA_DIR=../shared/data, or internet). ~80 min on 2 CPU cores.
Results: experiments/README.md, section ``fewrel``.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "fewrel"
    config.dataset = "fewrel"
    config.tokenizer = "wordpiece"
    config.ngram = 1
    config.model.pool = "mean+bow"  # "mean" alone loses to the bag-of-words floor
    config.methods = ("maml", "reptile", "multitask", "scratch", "ngram_centroid", "idf_centroid")
    config.max_len = 64
    return common.parse(arg, config)
