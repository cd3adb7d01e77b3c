"""An HF-initialised encoder: a local BERT directory (config.json, model.safetensors, tokenizer)
meta-fine-tuned with MAML on CLINC150 domains, against the same encoder fine-tuned directly.

    python -m experiments.fewshot --config experiments/configs/hf_bert.py \\
        --config.model.hf_path=/path/to/bert-directory

Any BertModel / Bert* checkpoint saved by transformers works (e.g. a downloaded
bert-base-uncased or prajjwal1/bert-tiny); the tokenizer saved beside it is used.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "hf_bert"
    config.dataset = "clinc150"
    config.tokenizer = "hf"
    config.ngram = 1
    config.max_len = 32
    config.model.hf_path = ""  # required: set with --config.model.hf_path
    config.inner_lr = 0.01
    config.outer_lr = 5e-5
    config.methods = ("maml", "protonet", "multitask", "scratch")
    return common.parse(arg, config)
