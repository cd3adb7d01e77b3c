"""FewRel relations, cross-domain: meta-train on Wikipedia relations, meta-test on NYT ones.

    python -m experiments.fewshot --config experiments/configs/fewrel.py
    python -m experiments.fewshot --config experiments/configs/fewrel.py:runlocal

Entities are marked in the text ([E1] head [/E1], [E2] tail [/E2]). Needs the FewRel source
files (METAFLAX_DATA_DIR=../shared/data, or internet).

Expected (measured 2026-11-29, idle 2-core CPU): 33 min 28 s; 5-way accuracy on the 25 NYT
relations, 1 / 5-shot, adapted: MAML 38.1 / 42.6, Reptile 33.8 / 41.5, multi-task 35.1 / 20.7
(fixed lr 0.01, no validation relations), bag-of-words floor 31.1 / 42.9 (experiments/README.md).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "fewrel"
    config.dataset = "fewrel"
    config.tokenizer = "wordpiece"
    config.ngram = 1
    config.model.pool = "mean+bow"  # "mean" alone loses to the bag-of-words floor (README)
    config.methods = ("maml", "reptile", "multitask", "scratch", "ngram_centroid", "idf_centroid")
    config.max_len = 64
    return common.parse(arg, config)
