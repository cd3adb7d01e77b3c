"""Task families for :mod:`experiments.fewshot`: data, model, loss and evaluation of each.

A :class:`Family` is everything the trainer needs to meta-train, pretrain and evaluate on one
kind of task, with meta-train and meta-test tasks disjoint by class or language:

- ``classification``: CLDR language identification, CLINC150 intents, HuffPost headlines,
  FewRel relations (meta-trained on labeled classes or on self-supervised SMLMT tasks); a BERT
  encoder and a per-task head set from the support set's class prototypes; accuracy.
- ``qa``: XQuAD extractive QA, a task is one article in one language, held-out languages at
  meta-test; a BERT encoder with a start/end span head; token-level exact match and F1.
- ``translation``: CLDR term translation and Tatoeba sentences, from a held-out language into
  English; a character-level encoder-decoder; chrF and BLEU (sacrebleu) of greedy decodes.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import metaflax as mf
from experiments.configs.common import with_fields
from metaflax import bert, heads, seq2seq
from metaflax.data import cldr, families, text_sources
from metaflax.data.sampler import LabeledTokens, episode_sampler
from metaflax.data.text import BOS, EOS, CharVocab

CLASSIFICATION = ("cldr", "clinc150", "huffpost", "fewrel")
TRANSLATION = ("cldr_terms", "tatoeba")
QA = ("xquad",)
DATASETS = CLASSIFICATION + TRANSLATION + QA

# adapt(params, support, key, num_steps) -> adapted params, as a method adapts at test time.
TestAdapt = Callable[[Any, Any, jax.Array, int], Any]


class Family(NamedTuple):
    """One task family, as the trainer sees it.

    Attributes:
      metrics: per-episode metrics reported, the first one in the results table.
      train_metric: the ``loss_fn`` metric shown during training (e.g. ``accuracy``).
      loss_fn: ``loss_fn(params, batch, key) -> (loss, metrics)``.
      params: initial parameters of the per-task model (meta-learning and ``scratch``).
      task_init: ``task_init(params, support)`` at the start of every task, or None.
      meta_batch: ``meta_batch(seed, step, num_tasks) -> Episode`` of meta-training tasks.
      multitask_params / multitask_batch: the non-meta baseline's model and its batches
        ``(seed, step) -> batch`` of ``examples_per_step`` pooled meta-training examples; None
        when the family has no labeled meta-training data.
      to_task_params: turns pretrained baseline parameters into per-task ones (e.g. a fresh head).
      evaluate: ``evaluate(adapt, params, shots, steps, cfg) -> {metric: [episodes, steps]}`` on
        meta-test tasks, the same episodes for every method.
      val_evaluate: the same on meta-validation classes (every learned method's "val" score,
        which chooses the baselines' test-time learning rate), or None where the family has
        none.
      centroid_evaluate: ``(shots, cfg, weighted=False) -> {metric: [episodes]}`` of the
        no-learning floor (n-gram nearest centroid; ``weighted``: tf-idf) on the same episodes;
        None where it does not apply.
      info: sizes, for the report.
    """

    metrics: tuple[str, ...]
    train_metric: str
    loss_fn: Callable
    params: Any
    task_init: Callable | None
    baseline_init: Callable | None
    meta_batch: Callable
    multitask_params: Any
    multitask_batch: Callable | None
    examples_per_step: int
    to_task_params: Callable
    evaluate: Callable
    val_evaluate: Callable | None
    centroid_evaluate: Callable | None
    info: dict


class Shared(NamedTuple):
    """A tokenizer and encoder shared by several families in one (mixed) meta-training run."""

    tokenizer: Any  # an HF tokenizer with [CLS]/[SEP]/[PAD]
    encoder: tuple  # (encode_fn, encoder_params, hidden) from make_encoder


def make_family(config, tokenizer=None, shared: Shared | None = None) -> Family:
    """The :class:`Family` of ``config.dataset``."""
    if config.dataset in CLASSIFICATION:
        return classification_family(config, tokenizer, shared)
    if config.dataset in TRANSLATION:
        return translation_family(config, shared)
    if config.dataset in QA:
        return qa_family(config, tokenizer, shared)
    raise ValueError(f"unknown dataset {config.dataset!r}; valid: {', '.join(DATASETS)}.")


def _data_dir(config) -> str | None:
    return config.data_dir or os.environ.get("METAFLAX_DATA_DIR")


def _split_languages(languages, config):
    train, _, test = cldr.language_split(
        languages, config.languages.num_test, 0, seed=config.languages.split_seed
    )
    return train, test


def _test_chunks(sampler, shots: int, cfg):
    """``(i, episodes)``: the meta-test episodes, ``eval.chunk`` at a time. They depend only on
    ``eval.seed`` and ``shots``, so every method sees the same ones."""
    for i in range(-(-cfg.eval.num_episodes // cfg.eval.chunk)):
        yield i, sampler.meta_batch(cfg.eval.seed + shots, i, cfg.eval.chunk)


@functools.lru_cache(maxsize=64)
def _chunk_program(score: Callable, adapt: TestAdapt, steps: tuple, batch: int) -> Callable:
    """``run(params, episodes, key)``: per episode of the chunk, ``score(adapted, episode, key)``
    after each of ``steps`` adaptation steps, stacked ``[steps, ...]``; jitted, ``batch``
    episodes in parallel. One compiled program per ``(score, adapt)``: validation and test
    classes, every shots setting and the fine-tuned methods (one ``adapt``, see
    :func:`fine_tune_adapt`) share it."""

    def one(params, episode, k):
        out = [score(adapt(params, episode.support, k, n), episode, k) for n in steps]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *out)

    @jax.jit
    def run(params, episodes, key):
        keys = jax.random.split(key, jax.tree.leaves(episodes)[0].shape[0])
        return jax.lax.map(lambda x: one(params, *x), (episodes, keys), batch_size=batch)

    return run


def _evaluate_chunks(score: Callable, adapt: TestAdapt, params, sampler, shots, steps, cfg):
    """``(episodes, outputs)`` of :func:`_chunk_program` per chunk of :func:`_test_chunks`, on
    the host."""
    run = _chunk_program(score, adapt, tuple(steps), cfg.eval.batch)
    for i, episodes in _test_chunks(sampler, shots, cfg):
        yield episodes, jax.device_get(run(params, episodes, jax.random.key(cfg.eval.seed + i)))


def check_counts(tokens: LabeledTokens, need: int, split: str, ways: int) -> None:
    """Every class of ``tokens`` has >= ``need`` examples, and there are >= ``ways`` classes."""
    counts = np.bincount(tokens.labels, minlength=len(tokens.class_names))
    small = np.flatnonzero(counts < need)
    if len(small):
        worst = int(np.argmin(counts))
        raise ValueError(
            f"{len(small)} {split} classes have fewer than shots+queries={need} examples "
            f"(smallest: {tokens.class_names[worst]!r} with {counts[worst]}); lower shots or "
            "queries."
        )
    if len(counts) < ways:
        raise ValueError(f"{split} has {len(counts)} classes, fewer than ways={ways}.")


# ----------------------------------------------------------------------------------------------
# Classification.


def labeled_texts(config) -> tuple[list[str], ...]:
    """``(train_texts, train_labels, val_texts, val_labels, test_texts, test_labels)`` with
    disjoint classes; the meta-validation classes (empty for FewRel) choose the baselines'
    test-time learning rate and are never trained on."""
    from metaflax.data import builders

    name = config.dataset
    if name == "cldr":
        splits = cldr.language_split(  # the test languages do not depend on num_val
            sorted(cldr.cldr_terms(config.languages.min_cldr_terms)),
            config.languages.num_test,
            config.languages.num_val,
            seed=config.languages.split_seed,
        )
        out = []
        for langs in splits:
            texts, labels, names = cldr.language_id_examples(langs)
            out += [texts, [names[i] for i in labels]]
        return tuple(out)
    src = _data_dir(config)
    if name == "clinc150":
        records = [
            r
            for split in ("train", "val", "test")
            for r in builders.records("clinc150", split, source_dir=src)
        ]
        texts, labels = text_sources.records_to_texts(records, "text", "intent")
        domains = [text_sources._text(r["domain"]) for r in records]
        groups = text_sources.classes_by_group(labels, domains)
        unknown = sorted(set(config.clinc.test_domains + config.clinc.val_domains) - set(groups))
        if unknown:
            raise ValueError(f"unknown CLINC150 domains {unknown}; valid: {sorted(groups)}.")
        test_classes = {c for d in config.clinc.test_domains for c in groups[d]}
        val_classes = {c for d in config.clinc.val_domains for c in groups[d]}
    elif name == "huffpost":
        records = builders.records("huffpost", "train", source_dir=src)
        texts, labels = text_sources.records_to_texts(records, "text", "label")
        test_classes = {str(c) for c in builders.HUFFPOST_CLASS_SPLIT["test"]}
        val_classes = {str(c) for c in builders.HUFFPOST_CLASS_SPLIT["val"]}
    else:  # fewrel
        texts, labels = [], []
        for domain in (config.fewrel.train_domain, config.fewrel.test_domain):
            for r in builders.records("fewrel", domain, source_dir=src):
                texts.append(_mark_entities(r))
                labels.append(f"{domain}/{text_sources._text(r['relation'])}")
        test_classes = {c for c in labels if c.startswith(config.fewrel.test_domain + "/")}
        val_classes = set()
    split = [[], [], [], [], [], []]
    for text, label in zip(texts, labels, strict=True):
        k = 4 if label in test_classes else 2 if label in val_classes else 0
        split[k].append(text)
        split[k + 1].append(label)
    return tuple(split)


def _mark_entities(record) -> str:
    """A FewRel sentence with its head and tail entities marked (``[E1] .. [/E1]``)."""
    tokens = [text_sources._text(t) for t in record["tokens"]]
    (h0, h1), (t0, t1) = (int(i) for i in record["head"]), (int(i) for i in record["tail"])
    out = []
    for i, tok in enumerate(tokens):
        out += ["[E1]"] * (i == h0) + ["[E2]"] * (i == t0) + [tok]
        out += ["[/E1]"] * (i == h1) + ["[/E2]"] * (i == t1)
    return " ".join(out)


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
    elif config.tokenizer != "hf":
        raise ValueError(f"tokenizer={config.tokenizer!r}; valid: 'char', 'wordpiece', 'hf'.")

    def encode(texts, labels):
        return text_sources.tokenize_labeled(texts, labels, tokenizer, config.max_len)

    return encode, tokenizer, len(tokenizer)


def make_encoder(config, vocab_size: int, idf: np.ndarray | None = None):
    """``(encode_fn, encoder_params, hidden)``: BERT from scratch or from ``model.hf_path``.
    ``model.pool="mean+bow"`` needs ``idf``, the IDF in the meta-training text of each token
    (``ngram=1``) or n-gram bucket (:func:`bag_width` wide)."""
    if config.model.hf_path:
        pretrained = bert.from_pretrained(config.model.hf_path, seed=config.seed)
        apply_fn, params = mf.functionalize(pretrained.encoder)
        hidden = pretrained.config.hidden_size
    else:
        cfg = bert.BertConfig(
            vocab_size=vocab_size,
            hidden_size=config.model.hidden,
            num_hidden_layers=config.model.layers,
            num_attention_heads=config.model.heads,
            intermediate_size=config.model.mlp,
            max_position_embeddings=config.max_len,
            pre_ln=True,
        )
        apply_fn, params = mf.functionalize(bert.BertEncoder(cfg, rngs=nnx.Rngs(config.seed)))
        hidden = cfg.hidden_size
    if config.model.pool == "cls":  # BERT's pooler on the first token
        return (lambda p, tokens, mask: apply_fn(p, tokens, mask)), params, hidden
    # fewshot.check_config has checked model.pool: "mean" or "mean+bow"

    def encode_fn(p, tokens, mask):  # mean of the final hidden states over real tokens
        seq, _ = apply_fn(p, tokens, mask)
        weights = mask.astype(seq.dtype)[..., None]
        return seq, jnp.sum(seq * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)

    if config.model.pool == "mean+bow":
        encode_fn, params = heads.with_bag_of_words(
            encode_fn, params, idf, config.ngram, config.model.bow_scale
        )
        hidden += len(idf)
    return encode_fn, params, hidden


def bag_width(config, vocab_size: int) -> int:
    """The width of ``mean+bow``'s bag: the vocabulary (``ngram=1``) or ``model.bow_buckets``."""
    return vocab_size if config.ngram == 1 else config.model.bow_buckets


def classification_family(config, tokenizer=None, shared: Shared | None = None) -> Family:
    """Few-shot classification on classes never seen in meta-training; accuracy."""
    train_texts, train_labels, val_texts, val_labels, test_texts, test_labels = labeled_texts(
        config
    )
    unlabeled = None
    if config.meta_train_on == "smlmt":
        from metaflax.data import builders

        if config.tokenizer == "char":
            raise ValueError("SMLMT masks words: use tokenizer='wordpiece' or 'hf', not 'char'.")
        source = builders.records("unlabeled_text", config.smlmt.text, source_dir=_data_dir(config))
        unlabeled = [text_sources._text(r["text"]) for r in source][: config.smlmt.max_sentences]
    elif config.meta_train_on != "classes":
        raise ValueError(f"meta_train_on={config.meta_train_on!r}; valid: 'classes', 'smlmt'.")
    if shared is not None:
        tokenizer = shared.tokenizer
        config = with_fields(config, tokenizer="hf")
    encode, tokenizer, vocab_size = _tokenizer(
        config, unlabeled if unlabeled is not None else train_texts, tokenizer
    )
    need = max(config.eval.shots) + config.eval.queries
    test = encode(test_texts, test_labels)
    check_counts(test, need, "meta-test", config.ways)
    val = None
    if val_texts:
        val = encode(val_texts, val_labels)
        check_counts(val, need, "meta-validation", config.ways)
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
        train = encode(train_texts, train_labels)
        check_counts(train, config.shots + config.queries, "meta-train", config.ways)
        sampler = episode_sampler(
            train, ways=config.ways, shots=config.shots, queries=config.queries
        )

    idf = None  # each token's (n-gram's) IDF in the meta-training text: mean+bow, idf_centroid
    if not shared and (config.model.pool == "mean+bow" or "idf_centroid" in config.methods):
        fit = train if train is not None else encode(unlabeled, [0] * len(unlabeled))
        width = bag_width(config, vocab_size)
        codes, valid = heads.ngram_codes(fit.tokens, fit.mask, config.ngram, width)
        idf = heads.inverse_document_frequency(codes, valid, width)
    encode_fn, encoder_params, hidden = (
        shared.encoder if shared else make_encoder(config, vocab_size, idf)
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
            chunks = _evaluate_chunks(accuracy, adapt, params, sampler, shots, steps, cfg)
            out = [o for _, o in chunks]
            return {"accuracy": np.concatenate(out)[: cfg.eval.num_episodes]}

        return evaluate

    def centroid_evaluate(shots: int, cfg, weighted: bool = False) -> dict:
        test_sampler = episode_sampler(test, ways=ways, shots=shots, queries=cfg.eval.queries)
        weights = idf if weighted else None
        accs = []
        for _, eps in _test_chunks(test_sampler, shots, cfg):
            for e in range(eps.support["tokens"].shape[0]):
                episode = jax.tree.map(lambda x, e=e: x[e], eps)
                accs.append(ngram_centroid_accuracy(episode, cfg.ngram, vocab_size, weights))
        return {"accuracy": np.asarray(accs)[: cfg.eval.num_episodes]}

    return Family(
        metrics=("accuracy",),
        train_metric="accuracy",
        loss_fn=loss_fn,
        params=heads.init_classifier(encoder_params, hidden, ways),
        task_init=heads.classifier_task_init(encode_fn, config.head_init, ways),
        baseline_init=heads.classifier_task_init(encode_fn, "proto", ways),
        meta_batch=sampler.meta_batch,
        multitask_params=None
        if train is None
        else heads.init_classifier(encoder_params, hidden, len(train.class_names)),
        multitask_batch=None if train is None else multitask_batch,
        examples_per_step=per_step,
        to_task_params=to_task_params,
        evaluate=evaluate_on(test),
        val_evaluate=None if val is None else evaluate_on(val),
        centroid_evaluate=centroid_evaluate,
        info={
            "meta_train_classes": 0 if train is None else len(train.class_names),
            "meta_val_classes": 0 if val is None else len(val.class_names),
            "meta_test_classes": len(test.class_names),
            "test_class_names": list(test.class_names),
            "vocab_size": vocab_size,
        },
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


# ----------------------------------------------------------------------------------------------
# Translation: a held-out language into English.


def translation_pairs(config) -> tuple[dict, dict]:
    """``({language: [(source, english)]}, ...)`` for meta-train and meta-test languages."""
    if config.dataset == "cldr_terms":
        languages = [
            lang
            for lang in sorted(cldr.cldr_terms(config.languages.min_cldr_terms))
            if lang != "en"
        ]
        pairs = {lang: [(b, a) for a, b in cldr.translation_pairs(lang)] for lang in languages}
    else:  # tatoeba
        from metaflax.data import builders

        pairs: dict[str, list] = {}
        for r in builders.records("tatoeba", "train", source_dir=_data_dir(config)):
            pairs.setdefault(text_sources._text(r["language"]), []).append(
                (text_sources._text(r["source"]), text_sources._text(r["english"]))
            )
        need = max(config.shots, max(config.eval.shots)) + max(config.queries, config.eval.queries)
        pairs = {k: v for k, v in pairs.items() if len(v) >= need}
    train_langs, test_langs = _split_languages(sorted(pairs), config)
    return {k: pairs[k] for k in train_langs}, {k: pairs[k] for k in test_langs}


def translation_family(config, shared: Shared | None = None) -> Family:
    """Few-shot translation from languages never seen in meta-training; chrF and BLEU.

    On its own: a character-level encoder-decoder. With ``shared``: the shared (BERT) encoder,
    the shared word-piece tokenizer ([CLS] / [SEP] as BOS / EOS) and a :class:`seq2seq.Decoder`.
    """
    train_pairs, test_pairs = translation_pairs(config)
    src_len, tgt_len = config.max_len, config.max_len + 2
    if shared is None:
        vocab = CharVocab.build(t for p in train_pairs.values() for pair in p for t in pair)
        vocab_size, bos, eos, decode = len(vocab), BOS, EOS, vocab.decode

        def enc_src(xs):
            return vocab.encode(xs, src_len)

        def enc_tgt(xs):
            return vocab.encode(xs, tgt_len, bos_eos=True)

        model = seq2seq.Seq2Seq(
            vocab_size,
            max_len=tgt_len,
            dim=config.model.hidden,
            num_layers=config.model.layers,
            num_heads=config.model.heads,
            mlp_dim=config.model.mlp,
            rngs=nnx.Rngs(config.seed),
        )
        apply_fn, params = mf.functionalize(model)
        start_fn, _ = mf.functionalize(model, "start_decoding")
        step_fn, _ = mf.functionalize(model, "decode_step")
    else:
        tok = shared.tokenizer
        vocab_size, bos, eos = len(tok), tok.cls_token_id, tok.sep_token_id

        def decode(ids):
            return tok.decode([int(i) for i in ids], skip_special_tokens=True)

        def _encode(xs, n):
            enc = tok(
                list(xs), max_length=n, truncation=True, padding="max_length", return_tensors="np"
            )
            return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)

        def enc_src(xs):
            return _encode(xs, src_len)

        def enc_tgt(xs):  # [CLS] words [SEP]: the BOS and EOS of decoding
            return _encode(xs, tgt_len)

        encode_fn, encoder_params, hidden = shared.encoder
        decoder = seq2seq.Decoder(
            vocab_size,
            memory_dim=hidden,
            max_len=tgt_len,
            dim=config.model.hidden,
            num_layers=config.model.layers,
            num_heads=config.model.heads,
            mlp_dim=config.model.mlp,
            rngs=nnx.Rngs(config.seed + 1),
        )
        decoder_apply, decoder_params = mf.functionalize(decoder)
        decoder_start, _ = mf.functionalize(decoder, "start_decoding")
        step_decoder, _ = mf.functionalize(decoder, "decode_step")
        params = {"encoder": encoder_params, "decoder": decoder_params}

        def apply_fn(p, src, src_mask, tgt_in, tgt_mask):
            memory, _ = encode_fn(p["encoder"], src, src_mask)
            return decoder_apply(p["decoder"], memory, src_mask, tgt_in, tgt_mask)

        def start_fn(p, src, src_mask, max_len):
            memory, _ = encode_fn(p["encoder"], src, src_mask)
            return decoder_start(p["decoder"], memory, src_mask, max_len)

        def step_fn(p, state, token, i):
            return step_decoder(p["decoder"], state, token, i)

    sampler = families.translation_sampler(
        train_pairs, enc_src, enc_tgt, shots=config.shots, queries=config.queries
    )
    loss_fn = seq2seq.seq2seq_loss_fn(apply_fn)
    pooled = [pair for p in train_pairs.values() for pair in p]
    pooled_src, pooled_src_mask = enc_src([a for a, _ in pooled])
    pooled_tgt, pooled_tgt_mask = enc_tgt([b for _, b in pooled])
    per_step = config.meta_batch_size * (config.shots + config.queries)

    def multitask_batch(seed, step):
        rows = np.random.default_rng([seed, step]).choice(len(pooled), per_step, False)
        return {
            "src": pooled_src[rows],
            "src_mask": pooled_src_mask[rows],
            "tgt": pooled_tgt[rows],
            "tgt_mask": pooled_tgt_mask[rows],
        }

    def greedy(adapted, episode, k):
        q = episode.query
        return seq2seq.greedy_decode(
            start_fn,
            step_fn,
            adapted,
            q["src"],
            q["src_mask"],
            bos_id=bos,
            eos_id=eos,
            max_len=tgt_len,
        )

    def evaluate(adapt: TestAdapt, params, shots: int, steps, cfg) -> dict:
        test_sampler = families.translation_sampler(
            test_pairs, enc_src, enc_tgt, shots=shots, queries=cfg.eval.queries
        )
        scores = {"chrf": [], "bleu": []}
        chunks = _evaluate_chunks(greedy, adapt, params, test_sampler, shots, steps, cfg)
        for eps, decoded in chunks:
            for e in range(decoded.shape[0]):  # [episodes, steps, queries, len]
                refs = [decode(t) for t in eps.query["tgt"][e]]
                per_steps = [
                    seq2seq.translation_metrics([decode(t) for t in decoded[e, j]], refs)
                    for j in range(len(steps))
                ]
                for m in scores:
                    scores[m].append([s[m] / 100 for s in per_steps])
        return {m: np.asarray(v)[: cfg.eval.num_episodes] for m, v in scores.items()}

    return Family(
        metrics=("chrf", "bleu"),
        train_metric="token_accuracy",
        loss_fn=loss_fn,
        params=params,
        task_init=None,
        baseline_init=None,
        meta_batch=sampler.meta_batch,
        multitask_params=params,
        multitask_batch=multitask_batch,
        examples_per_step=per_step,
        to_task_params=lambda p: p,
        evaluate=evaluate,
        val_evaluate=None,
        centroid_evaluate=None,
        info={
            "meta_train_languages": sorted(train_pairs),
            "meta_test_languages": sorted(test_pairs),
            "vocab_size": vocab_size,
        },
    )


@functools.lru_cache(maxsize=64)  # one function per family, so its evaluation compiles once
def fine_tune_adapt(loss_fn, task_init) -> TestAdapt:
    """The baselines' test-time adaptation of ``(params, lr)``: ``task_init`` then SGD steps at
    ``lr`` on the support set. ``lr`` is an input of the compiled evaluation, not a constant in
    it: one program serves every learning rate of the grid and every fine-tuned method."""

    def adapt(params_lr, support, key, num_steps):
        params, lr = params_lr
        if num_steps == 0:
            return params if task_init is None else task_init(params, support)
        fn = mf.make_adapt_fn(loss_fn, optax.sgd(lr), num_steps, task_init=task_init)
        return fn(params, support, key)[0]

    return adapt


# ----------------------------------------------------------------------------------------------
# Extractive QA: articles in held-out languages.


def qa_examples(config) -> tuple[list, list]:
    """XQuAD ``QAExample``s of the meta-train and meta-test languages (task = language/title)."""
    from metaflax.data import builders

    source = builders.records("xquad", "test", source_dir=_data_dir(config))
    by_lang: dict[str, list] = {}
    for r in source:
        lang = text_sources._text(r["language"])
        by_lang.setdefault(lang, []).append(
            families.QAExample(
                f"{lang}/{text_sources._text(r['title'])}",
                text_sources._text(r["question"]),
                text_sources._text(r["context"]),
                text_sources._text(r["answer_text"]),
                int(r["answer_start"]),
            )
        )
    train_langs, test_langs = _split_languages(sorted(by_lang), config)
    return [e for k in train_langs for e in by_lang[k]], [e for k in test_langs for e in by_lang[k]]


def qa_family(config, tokenizer=None, shared: Shared | None = None) -> Family:
    """Few-shot extractive QA on articles of languages never seen in meta-training; EM and F1."""
    train_ex, test_ex = qa_examples(config)
    if shared is not None:
        tokenizer = shared.tokenizer
    elif config.tokenizer == "wordpiece":
        tokenizer = text_sources.train_wordpiece(
            [t for e in train_ex for t in (e.question, e.context)], config.wordpiece_vocab
        )
    elif config.tokenizer != "hf":
        raise ValueError(f"tokenizer={config.tokenizer!r}; QA needs 'wordpiece' or 'hf'.")
    train_tok = families.tokenize_qa(train_ex, tokenizer, config.max_len)  # once per split
    test_tok = families.tokenize_qa(test_ex, tokenizer, config.max_len)
    pooled, dropped_train, dropped_test = train_tok[0], train_tok[2], test_tok[2]
    with warnings.catch_warnings():  # answers beyond max_len are dropped (and counted)
        warnings.simplefilter("ignore")
        sampler = families.qa_sampler(
            train_ex,
            tokenizer,
            shots=config.shots,
            queries=config.queries,
            max_len=config.max_len,
            tokenized=train_tok,
        )
    encode_fn, encoder_params, hidden = (
        shared.encoder if shared else make_encoder(config, len(tokenizer))
    )
    loss_fn = heads.span_loss_fn(encode_fn)
    params = heads.init_span_head(encoder_params, hidden)
    per_step = config.meta_batch_size * (config.shots + config.queries)

    def multitask_batch(seed, step):
        rows = np.random.default_rng([seed, step]).choice(len(pooled["start"]), per_step, False)
        return {k: v[rows] for k, v in pooled.items()}

    def span_scores(adapted, episode, k):
        metrics = loss_fn(adapted, episode.query, k)[1]
        return {m: metrics[m] for m in ("f1", "exact_match")}

    def evaluate(adapt: TestAdapt, params, shots: int, steps, cfg) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            test_sampler = families.qa_sampler(
                test_ex,
                tokenizer,
                shots=shots,
                queries=cfg.eval.queries,
                max_len=config.max_len,
                tokenized=test_tok,
            )

        chunks = _evaluate_chunks(span_scores, adapt, params, test_sampler, shots, steps, cfg)
        out = [o for _, o in chunks]
        return {
            m: np.concatenate([o[m] for o in out])[: cfg.eval.num_episodes]
            for m in ("f1", "exact_match")
        }

    return Family(
        metrics=("f1", "exact_match"),
        train_metric="f1",
        loss_fn=loss_fn,
        params=params,
        task_init=None,
        baseline_init=None,
        meta_batch=sampler.meta_batch,
        multitask_params=params,
        multitask_batch=multitask_batch,
        examples_per_step=per_step,
        to_task_params=lambda p: p,
        evaluate=evaluate,
        val_evaluate=None,
        centroid_evaluate=None,
        info={
            "meta_train_questions": len(train_ex),
            "meta_test_questions": len(test_ex),
            "answers_dropped_beyond_max_len": {"train": dropped_train, "test": dropped_test},
        },
    )


# ----------------------------------------------------------------------------------------------
# Several families in one meta-training run.


def mixed_families(config) -> dict[str, Family]:
    """``config.mixed.datasets`` meta-trained together: one word-piece tokenizer trained on all
    their meta-training text and one BERT encoder shared by the classification head, the span
    head and the translation decoder. Per-dataset settings in ``config.mixed.overrides``."""
    subs = {
        name: with_fields(config, dataset=name, **config.mixed.overrides.to_dict().get(name, {}))
        for name in config.mixed.datasets
    }
    unknown = sorted(set(subs) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown mixed datasets {unknown}; valid: {', '.join(DATASETS)}.")
    texts = []
    for name, sub in subs.items():
        if name in CLASSIFICATION:
            texts += labeled_texts(sub)[0]
        elif name in QA:
            texts += [t for e in qa_examples(sub)[0] for t in (e.question, e.context)]
        else:
            texts += [t for p in translation_pairs(sub)[0].values() for pair in p for t in pair]
    tokenizer = text_sources.train_wordpiece(texts, config.wordpiece_vocab)
    max_len = max(sub.max_len for sub in subs.values())
    shared = Shared(tokenizer, make_encoder(with_fields(config, max_len=max_len), len(tokenizer)))
    return {name: make_family(sub, shared=shared) for name, sub in subs.items()}
