"""Few-shot text classification on classes never seen in meta-training: CLDR language
identification, CLINC150 intents, HuffPost headlines, FewRel relations (meta-trained on labeled
classes or on self-supervised SMLMT tasks); a BERT encoder and a per-task head set from the
support set's class prototypes; accuracy."""

from __future__ import annotations

import warnings

import jax
import numpy as np

from experiments.configs.common import with_fields
from experiments.families.common import (
    ClassBaselines,
    Family,
    Pooled,
    Shared,
    TestAdapt,
    bag_width,
    evaluate_chunks,
    inputs,
    make_encoder,
    test_chunks,
)
from experiments.families.sources import labeled_texts
from metaflax import bert, heads
from metaflax.data import corpora, families, text_sources
from metaflax.data.sampler import LabeledTokens, class_split, episode_sampler
from metaflax.data.text import CharVocab


def usable_classes(tokens: LabeledTokens, need: int, split: str, ways: int) -> LabeledTokens:
    """``tokens`` without the classes that have fewer than ``need`` examples (dropped with a
    warning naming them and their counts); fewer than ``ways`` classes left is one error."""
    counts = np.bincount(tokens.labels, minlength=len(tokens.class_names))
    small = {tokens.class_names[c]: int(counts[c]) for c in np.flatnonzero(counts < need)}
    if small:
        warnings.warn(
            f"{len(small)} {split} classes have fewer than shots+queries={need} examples and are "
            f"dropped: {dict(list(small.items())[:20])}",
            stacklevel=2,
        )
        tokens = class_split(tokens, [c for c in tokens.class_names if c not in small])
    if len(tokens.class_names) < ways:
        raise ValueError(
            f"{split} has {len(tokens.class_names)} classes with >= shots+queries={need} "
            f"examples, fewer than ways={ways}: lower --config.ways (or shots / queries), or give "
            "this split more classes (--config.data.class_fractions or --config.data.class_split)."
        )
    return tokens


def cut_share(config, tokenizer, texts) -> float:
    """The share of ``texts`` longer than ``max_len`` tokens (cut when tokenized)."""
    if not texts:
        return 0.0
    if config.tokenizer == "char":  # the vocabulary adds BOS and EOS
        return float(np.mean([len(t) + 2 > config.max_len for t in texts]))
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    return float(np.mean(np.asarray(lengths) > config.max_len))


def _char_tokens(vocab: CharVocab, texts, labels, max_len) -> LabeledTokens:
    ids, mask = vocab.encode(list(texts), max_len, bos_eos=True)  # BOS plays BERT's [CLS]
    class_names = tuple(sorted(set(labels)))
    index = {c: i for i, c in enumerate(class_names)}
    return LabeledTokens(ids, mask, np.array([index[c] for c in labels], np.int32), class_names)


def _tokenizer(config, fit_texts, tokenizer):
    """``(encode(texts, labels) -> LabeledTokens, tokenizer, vocab_size)``, fit on meta-train."""
    if config.tokenizer == "char":
        vocab = CharVocab.build(fit_texts)
        return (lambda t, y: _char_tokens(vocab, t, y, config.max_len)), vocab, len(vocab)
    if config.tokenizer == "wordpiece":
        tokenizer = text_sources.train_wordpiece(fit_texts, config.wordpiece_vocab)

    def encode(texts, labels):
        return text_sources.tokenize_labeled(texts, labels, tokenizer, config.max_len)

    return encode, tokenizer, len(tokenizer)


def classification_family(config, tokenizer=None, shared: Shared | None = None) -> Family:
    """Few-shot classification on classes never seen in meta-training; accuracy."""
    separator = " "  # between text columns: the tokenizer's [SEP] where it has one
    if config.tokenizer == "wordpiece" or shared is not None:
        separator = " [SEP] "
    elif config.tokenizer == "hf" and getattr(tokenizer, "sep_token", None):
        separator = f" {tokenizer.sep_token} "
    split = labeled_texts(config, separator)
    unlabeled = None
    if config.meta_train_on == "smlmt":
        unlabeled = corpora.unlabeled_text(
            config.smlmt.text, max_sentences=config.smlmt.max_sentences, path=config.data_dir
        )
    if shared is not None:
        tokenizer = shared.tokenizer
        config = with_fields(config, tokenizer="hf")
    encode, tokenizer, vocab_size = _tokenizer(
        config, unlabeled if unlabeled is not None else split.train_texts, tokenizer
    )
    need = max(config.eval.shots) + config.eval.queries
    test = usable_classes(
        encode(split.test_texts, split.test_labels), need, "meta-test", config.ways
    )
    val = None
    if split.val_texts:
        val = encode(split.val_texts, split.val_labels)
        val = usable_classes(val, need, "meta-validation", config.ways)
    if unlabeled is not None:
        train = None
        sampler = families.smlmt_sampler(
            unlabeled,
            tokenizer,
            ways=config.ways,
            shots=config.shots,
            queries=config.queries,
            max_len=config.max_len,
        )
    else:
        train = encode(split.train_texts, split.train_labels)
        per_class = config.shots + config.queries
        train = usable_classes(train, per_class, "meta-train", config.ways)

    idf = None  # each token's (n-gram's) IDF in the meta-training text: mean+bow, idf_centroid
    if not shared and (config.model.pool == "mean+bow" or "idf_centroid" in config.methods):
        fit = train if train is not None else encode(unlabeled, [0] * len(unlabeled))
        width = bag_width(config, vocab_size)
        codes, valid = heads.ngram_codes(fit.tokens, fit.mask, config.ngram, width)
        idf = heads.inverse_document_frequency(codes, valid, width)
    encoder = shared.encoder if shared else make_encoder(config, vocab_size, idf)
    encode_fn, encoder_params, hidden, trunk = encoder
    test_tokens = test  # token ids, for the n-gram floors
    if trunk is not None:  # the model reads the frozen trunk's outputs, computed once per text
        train, val, test = (
            None if t is None else t._replace(tokens=inputs(encoder, t.tokens, t.mask))
            for t in (train, val, test)
        )
    if train is not None:
        sampler = episode_sampler(
            train, ways=config.ways, shots=config.shots, queries=config.queries
        )
    loss_fn = heads.classification_loss_fn(encode_fn)
    ways = config.ways
    per_step = config.meta_batch_size * ways * (config.shots + config.queries)  # same examples

    def multitask_batch(seed, step):
        rows = np.random.default_rng([seed, step]).choice(len(train.labels), per_step, False)
        return {"tokens": train.tokens[rows], "mask": train.mask[rows], "label": train.labels[rows]}

    def to_task_params(params):  # the pretraining head is replaced by a ways-sized one
        return {**params, "head": heads.init_classifier(None, hidden, ways)["head"]}

    def accuracy(adapted, episode, k):
        return loss_fn(adapted, episode.query, k)[1]["accuracy"]

    def evaluate_on(tokens: LabeledTokens):
        def evaluate(adapt: TestAdapt, params, shots: int, steps, cfg) -> dict:
            sampler = episode_sampler(tokens, ways=ways, shots=shots, queries=cfg.eval.queries)
            chunks = evaluate_chunks(accuracy, adapt, params, sampler, shots, steps, cfg)
            out = [o for _, o in chunks]
            return {"accuracy": np.concatenate(out)[: cfg.eval.num_episodes]}

        return evaluate

    def centroid_evaluate(shots: int, cfg, weighted: bool = False) -> dict:
        test_sampler = episode_sampler(
            test_tokens, ways=ways, shots=shots, queries=cfg.eval.queries
        )
        weights = idf if weighted else None
        accs = []
        for _, eps in test_chunks(test_sampler, shots, cfg):
            for e in range(eps.support["tokens"].shape[0]):
                episode = jax.tree.map(lambda x, e=e: x[e], eps)
                accs.append(ngram_centroid_accuracy(episode, cfg.ngram, vocab_size, weights))
        return {"accuracy": np.asarray(accs)[: cfg.eval.num_episodes]}

    def export(path, method, params, cfg, test_lr):
        from experiments import adapt  # the fine-tune stage reads what this writes

        bert_config = None
        if config.model.hf_path:
            bert_config = bert.from_pretrained(config.model.hf_path).config
        adapt.export(
            path,
            method=method,
            meta_params=params,
            trunk=trunk,
            config=cfg,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            ways=ways,
            bert_config=bert_config,
            idf=idf if config.model.pool == "mean+bow" else None,
            test_lr=test_lr,
        )

    pooled = None
    if train is not None:
        params = heads.init_classifier(encoder_params, hidden, len(train.class_names))
        pooled = Pooled(params, multitask_batch, per_step)
    return Family(
        metrics=("accuracy",),
        train_metric="accuracy",
        loss_fn=loss_fn,
        params=heads.init_classifier(encoder_params, hidden, ways),
        task_init=heads.classifier_task_init(encode_fn, config.head_init, ways),
        meta_batch=sampler.meta_batch,
        evaluate=evaluate_on(test),
        to_task_params=to_task_params,
        info={
            "meta_train_classes": 0 if train is None else len(train.class_names),
            "meta_val_classes": 0 if val is None else len(val.class_names),
            "meta_test_classes": len(test.class_names),
            "test_class_names": list(test.class_names),
            "vocab_size": vocab_size,
            "class_split": {
                "train": [] if train is None else list(train.class_names),
                "val": [] if val is None else list(val.class_names),
                "test": list(test.class_names),
            },
            "cut_at_max_len": {
                part: cut_share(config, tokenizer, texts)
                for part, texts in (
                    ("train", split.train_texts),
                    ("val", split.val_texts),
                    ("test", split.test_texts),
                )
            },
        },
        pooled=pooled,
        classes=ClassBaselines(
            proto_init=heads.classifier_task_init(encode_fn, "proto", ways),
            val_evaluate=None if val is None else evaluate_on(val),
            centroid_evaluate=centroid_evaluate,
            export=None if shared else export,
            ridge_init=heads.classifier_task_init(encode_fn, "ridge", ways),
        ),
    )


def ngram_centroid_accuracy(episode, n: int, vocab_size: int, idf=None) -> float:
    """The no-learning floor: cosine nearest centroid of bag-of-n-gram (token id) counts, all
    orders 1..``n`` together.

    With a character vocabulary and ``n=3`` this is a character 1-3-gram classifier (BOS / EOS
    mark word boundaries); with a word-piece vocabulary and ``n=1``, bag of words; with ``idf``
    (``n=1`` only) each count is multiplied by its token's IDF (tf-idf). Returns the query
    accuracy.
    """
    tokens = np.concatenate([episode.support["tokens"], episode.query["tokens"]]).astype(np.int64)
    mask = np.concatenate([episode.support["mask"], episode.query["mask"]]).astype(bool)
    all_codes, all_rows = [], []
    for order in range(1, n + 1):  # an order-m code is unique across orders: code * n + m - 1
        length = tokens.shape[1] - order + 1
        codes = sum(tokens[:, i : i + length] * vocab_size ** (order - 1 - i) for i in range(order))
        valid = np.all([mask[:, i : i + length] for i in range(order)], axis=0)
        all_codes.append(codes[valid] * n + order - 1)
        all_rows.append(np.broadcast_to(np.arange(len(tokens))[:, None], codes.shape)[valid])
    uniq, col = np.unique(np.concatenate(all_codes), return_inverse=True)
    feats = np.zeros((len(tokens), len(uniq)))
    np.add.at(feats, (np.concatenate(all_rows), col), 1.0)
    if idf is not None:  # n == 1: a code is its token id
        feats *= np.asarray(idf)[uniq][None]
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-9)
    num_support, labels = len(episode.support["tokens"]), episode.support["label"]
    ways = int(labels.max()) + 1
    centroids = np.stack([feats[:num_support][labels == c].mean(0) for c in range(ways)])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-9)
    predicted = np.argmax(feats[num_support:] @ centroids.T, axis=1)
    return float(np.mean(predicted == episode.query["label"]))
