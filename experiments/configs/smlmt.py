"""Self-supervised meta-pretraining (SMLMT, Bansal et al. 2020) on unlabeled text, evaluated
few-shot on CLINC150's held-out domains: no labeled data at all in meta-training.

    python -m experiments.fewshot --config experiments/configs/smlmt.py
    python -m experiments.fewshot --config experiments/configs/smlmt.py:runlocal

A task masks one of N words in sentences that contain it; the label is which word. The
tokenizer is a WordPiece vocabulary trained on the same unlabeled text (CLINC's Wikipedia
sentences). Compare with clinc150.py (labeled meta-training) side by side. Needs
METAFLAX_DATA_DIR=../shared/data (or internet); ~16 min on 2 CPU cores.
Results: experiments/README.md, section ``smlmt``.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "smlmt"
    config.dataset = "clinc150"
    config.meta_train_on = "smlmt"
    config.tokenizer = "wordpiece"
    config.ngram = 1
    config.max_len = 32
    config.methods = ("maml", "reptile", "protonet", "scratch")
    return common.parse(arg, config)
