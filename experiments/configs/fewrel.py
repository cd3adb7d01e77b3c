"""FewRel relations, cross-domain: meta-train on Wikipedia relations, meta-test on NYT ones.

    python -m experiments.fewshot --config experiments/configs/fewrel.py
    python -m experiments.fewshot --config experiments/configs/fewrel.py:runlocal

Entities are marked in the text ([E1] head [/E1], [E2] tail [/E2]). Needs the FewRel source
files (METAFLAX_DATA_DIR=../shared/data, or internet).

Expected (measured 2026-11-30, 2-core CPU shared with other runs throughout;
experiments/README.md): 80 min; 5-way accuracy on the 25 NYT relations, 1 / 5-shot, adapted:
MAML 43.0 / 57.5, Reptile 43.3 / 57.5, multi-task 41.3 / 54.4 (fixed lr 0.01, no validation
relations), untrained 31.2 / 43.7, bag-of-words floor 31.0 / 43.0, tf-idf floor 37.3 / 52.5.
With model.pool="mean": MAML 38.1 / 42.6.
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
