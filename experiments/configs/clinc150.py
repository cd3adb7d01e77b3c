"""CLINC150 intents, split by domain: meta-test on 3 domains (45 intents) never seen in training.

    python -m experiments.fewshot --config experiments/configs/clinc150.py
    python -m experiments.fewshot --config experiments/configs/clinc150.py:runlocal

Needs the CLINC150 source files (METAFLAX_DATA_DIR=../shared/data, or internet).
Expected (measured 2026-11-30, 2-core CPU shared with two other runs; experiments/README.md):
58 min; 5-way accuracy 1 / 5-shot after each method's test-time steps: MAML 78.4 / 92.6,
Reptile 78.6 / 92.7, multi-task 79.3 / 92.7, untrained 72.4 / 92.5, bag-of-words floor 72.2 /
92.5, tf-idf floor 78.6 / 93.3. With model.pool="mean": MAML 49.8 / 51.1.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "clinc150"
    config.dataset = "clinc150"
    config.tokenizer = "wordpiece"  # trained on the meta-training utterances only
    config.ngram = 1
    config.model.pool = "mean+bow"  # "mean" alone loses to the bag-of-words floor (README)
    config.methods = ("maml", "reptile", "multitask", "scratch", "ngram_centroid", "idf_centroid")
    config.max_len = 32
    return common.parse(arg, config)
