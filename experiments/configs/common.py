"""Defaults shared by the few-shot text classification configs (``experiments.fewshot``)."""

import math

import ml_collections


def with_fields(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``fields`` replaced; a nested ConfigDict given as a dict is
    updated field by field (``b={"c": 5}`` keeps ``b.d``): per-method and per-dataset overrides."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.update(fields)
    return out


def add_algorithm_settings(config: ml_collections.ConfigDict) -> None:
    """The settings of the meta-learners that have more than inner and outer optimizers."""
    # MAML++ ("mamlpp": LSLR with these schedules, 5 inner steps), as fractions of num_steps:
    # the multi-step loss anneals over the first tenth, first order for the first quarter
    config.mamlpp = ml_collections.ConfigDict({"multi_step_loss": 0.1, "first_order": 0.25})
    # iMAML: the proximal strength and the conjugate-gradient iterations of its meta-gradient
    config.imaml = ml_collections.ConfigDict({"lam": 1.0, "cg_steps": 5})


def algorithm_kwargs(method: str, config: ml_collections.ConfigDict) -> dict:
    """What ``add_algorithm_settings`` means for ``mf.make_algorithm(method, ...)`` (a fraction
    above 0 of even a few steps is at least one step)."""
    if method == "mamlpp":
        return dict(
            multi_step_loss=math.ceil(config.mamlpp.multi_step_loss * config.num_steps),
            first_order_steps=math.ceil(config.mamlpp.first_order * config.num_steps),
        )
    if method == "imaml":
        return dict(lam=config.imaml.lam, cg_steps=config.imaml.cg_steps)
    return {}


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "fewshot"
    # a built-in dataset, a user's labeled file (.csv .tsv .jsonl .json .parquet) or a TFDS
    # catalog dataset ("tfds:NAME"); several sources joined with "+" are meta-trained together
    config.dataset = "cldr"
    # meta-test on every class of this source instead of the test classes of `dataset` (whose
    # test classes then join meta-training); "" = no cross-dataset meta-testing
    config.test_dataset = ""
    config.data = ml_collections.ConfigDict()  # users' files and TFDS catalog datasets
    config.data.text_columns = ("text",)  # several: joined with the tokenizer's [SEP]
    config.data.label_column = "label"
    config.data.tfds_split = "train"
    # meta-train / meta-validation / meta-test classes: a JSON file {"train": [...], "val":
    # [...], "test": [...]}, or "" = a random split of the classes by class_fractions
    config.data.class_split = ""
    config.data.class_fractions = (0.6, 0.2, 0.2)
    config.data.split_seed = 0
    config.data_dir = ""  # source files; "" = METAFLAX_DATA_DIR, else download
    config.seed = 0
    config.meta_train_on = "classes"  # "classes" (labeled) | "smlmt" (unlabeled text)
    config.tokenizer = "char"  # "char" | "wordpiece" | "hf" (model.hf_path's tokenizer)
    config.wordpiece_vocab = 8000
    # n-gram orders of the ngram_centroid floor and of mean+bow's bag: 3 = character 1-3-grams
    # (hashed into model.bow_buckets for the bag); 1 = bag of word pieces
    config.ngram = 3
    config.max_len = 24

    config.model = ml_collections.ConfigDict()
    config.model.hf_path = ""  # a local HF BERT directory; "" = train from scratch
    config.model.hidden = 64
    config.model.layers = 2
    config.model.heads = 2
    config.model.mlp = 128
    # sentence vector: "mean" of the final states | "cls" (pooler) | "mean+bow" (the mean and a
    # bag of tokens, or of n-grams, weighted by a learned function of their IDF:
    # heads.with_bag_of_words)
    config.model.pool = "mean"
    config.model.bow_scale = 4.0  # mean+bow: the bag's initial weight against the mean (learned)
    config.model.bow_buckets = 2**12  # mean+bow with ngram > 1: the hashed bag's width
    # a pretrained encoder's top blocks that are trained (with the pooler and the head); the
    # embeddings and lower blocks stay frozen and their outputs are computed once per text and
    # cached; -1 = the whole encoder is trained
    config.model.train_layers = -1

    config.methods = ("maml", "reptile", "multitask", "ngram_centroid")
    config.ways = 5
    config.shots = 5  # meta-training support shots
    config.queries = 5
    config.meta_batch_size = 4
    config.num_steps = 1200
    config.num_inner_steps = 1
    config.inner_lr = 0.03
    config.head_init = "proto"  # the head at the start of every task: "proto" | "zero" | "learned"
    config.outer_lr = 3e-3
    config.outer_clip = 1.0
    config.warmup_steps = 100
    # Per-method overrides of the fields above (nested fields update recursively). Equal
    # compute: the multi-task baseline gets the steps that take MAML's wall time (a pooled step
    # is about 2.2x cheaper than a second-order MAML step over the same examples).
    config.overrides = ml_collections.ConfigDict(
        {
            "reptile": {"num_inner_steps": 5, "eval": {"report_steps": 5}},
            "imaml": {"num_inner_steps": 5, "eval": {"report_steps": 5}},
            "mamlpp": {"num_inner_steps": 5, "eval": {"report_steps": 5}},
            "multitask": {"num_steps": 2700},
        }
    )
    add_algorithm_settings(config)

    config.num_devices = 1  # meta-batch tasks sharded over this many devices; 0 = all
    config.log_every = 50
    config.checkpoint_every = 500
    config.checkpoints_to_keep = 2
    config.quiet = False  # no progress bar

    config.eval = ml_collections.ConfigDict()
    config.eval.shots = (1, 5)
    config.eval.queries = 5
    config.eval.num_episodes = 600
    config.eval.steps = (0, 1, 5)  # adaptation steps at test (accuracy-vs-steps plot)
    # The table's "adapted" column: the steps each method is reported at (meta-learners: the
    # inner steps they were trained with; set per method in overrides).
    config.eval.report_steps = 1
    # ProtoNet and the baselines fine-tune at test with SGD at the learning rate of lr_grid that
    # scores best on val_episodes episodes of the meta-validation classes (per shots setting);
    # at inner_lr where a dataset has no validation classes (FewRel, QA, translation).
    config.eval.lr_grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    config.eval.val_episodes = 100
    config.eval.inner_lr = 0.01
    config.eval.chunk = 100  # episodes per jitted evaluation call
    config.eval.batch = 25  # episodes adapted in parallel
    config.eval.seed = 1000

    config.languages = ml_collections.ConfigDict()  # CLDR and Tatoeba: split by language
    config.languages.min_cldr_terms = 800  # CLDR languages with >= this many terms (127)
    config.languages.num_test = 25  # held-out languages (meta-test)
    config.languages.num_val = 10  # CLDR language ID: meta-validation languages
    config.languages.split_seed = 0
    config.clinc = ml_collections.ConfigDict()
    config.clinc.test_domains = ("banking", "credit_cards", "travel")
    config.clinc.val_domains = ("home",)
    config.fewrel = ml_collections.ConfigDict()
    config.fewrel.train_domain = "wiki"
    config.fewrel.test_domain = "nyt"
    config.smlmt = ml_collections.ConfigDict()
    config.smlmt.text = "wiki"
    config.smlmt.max_sentences = 20000
    return config


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config to a CPU smoke size (seconds per method)."""
    config.num_steps = 20
    config.overrides.multitask.num_steps = 20
    config.overrides.reptile.eval.report_steps = 1
    config.overrides.imaml.eval.report_steps = 1
    config.overrides.mamlpp.eval.report_steps = 1
    config.warmup_steps = 5
    config.log_every = 5
    config.checkpoint_every = 10
    config.meta_batch_size = 2
    config.model.hidden = 32
    config.model.mlp = 64
    config.model.layers = 1
    config.eval.num_episodes = 20
    config.eval.val_episodes = 10
    config.eval.lr_grid = (0.001, 0.01)
    config.eval.chunk = 10
    config.eval.batch = 10
    config.eval.steps = (0, 1)
    config.eval.report_steps = 1
    config.quiet = True
    return config


def parse(arg: str | None, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Applies comma-separated config arguments (``runlocal``)."""
    for a in (arg or "").split(","):
        if a == "runlocal":
            runlocal(config)
        elif a:
            raise ValueError(f"unknown config argument {a!r}; valid: 'runlocal'.")
    return config
