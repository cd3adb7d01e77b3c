"""HuffPost headlines, the class split of Bao et al. 2020 (20 meta-train, 16 meta-test classes).

    python -m experiments.fewshot --config experiments/configs/huffpost.py
    python -m experiments.fewshot --config experiments/configs/huffpost.py:runlocal

Needs the HuffPost source file (METAFLAX_DATA_DIR=../shared/data, or internet). Expected
result and wall time: experiments/README.md (filled from a real run).
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
