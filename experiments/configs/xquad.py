"""XQuAD extractive QA: a task is one article in one language; meta-test on held-out languages.

    python -m experiments.fewshot --config experiments/configs/xquad.py
    python -m experiments.fewshot --config experiments/configs/xquad.py:runlocal

12 languages x 48 articles (1190 questions each); 3 languages held out. A WordPiece vocabulary
trained on the meta-training languages' text, a BERT encoder with a start/end span head; token
exact match and F1. Needs the XQuAD source files (METAFLAX_DATA_DIR=../shared/data, or
internet). Set model.hf_path (and tokenizer="hf") for a multilingual HF encoder. ~30 min on
2 CPU cores. Results: experiments/README.md, section ``xquad``.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "xquad"
    config.dataset = "xquad"
    config.tokenizer = "wordpiece"
    config.max_len = 192
    config.languages.num_test = 3
    config.shots = 4
    config.queries = 4
    config.eval.shots = (4, 8)
    config.eval.queries = 4
    config.methods = ("maml", "reptile", "multitask", "scratch")
    return common.parse(arg, config)
