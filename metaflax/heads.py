"""Task heads on top of an encoder, and their ``loss_fn``s for the NLP task families.

Params are ``{"encoder": <encoder params>, "head": {...}}``; ``encode_fn(encoder_params,
tokens, mask) -> (sequence_output [b, t, h], pooled [b, h])`` is the functionalized encoder
(e.g. :class:`metaflax.bert.BertEncoder`).

Episodic classification permutes labels per episode, so a meta-learned head cannot mean anything
per class. Two standard fixes, as ``task_init`` for the algorithms:

- ``head_init="zero"``: the head is set to zero at the start of every task (Kao et al. 2022);
- ``head_init="proto"``: the head is set from the support set's class prototypes, ``W_c = 2 mu_c``,
  ``b_c = -|mu_c|^2`` (Proto-MAML, Triantafillou et al. 2020), differentiably;
- ``head_init="ridge"``: the head is the ridge regression of the support set's one-hot labels on
  its features, solved in closed form (R2D2, Bertinetto et al. 2019; Bao et al. 2020), with a
  meta-learned regularisation and output scale (:func:`ridge_head`).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
EncodeFn = Callable[[PyTree, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
HEAD_INITS = ("learned", "zero", "proto", "ridge")


def init_classifier(encoder_params: PyTree, hidden: int, ways: int) -> dict:
    """``{"encoder": ..., "head": {"kernel": [hidden, ways], "bias": [ways]}}``, head zeroed."""
    return {
        "encoder": encoder_params,
        "head": {"kernel": jnp.zeros((hidden, ways)), "bias": jnp.zeros((ways,))},
    }


def inverse_document_frequency(tokens, mask, vocab_size: int) -> np.ndarray:
    """``log((n + 1) / (df + 1))`` per token id over the ``n`` rows of ``tokens`` ``[n, t]``
    (``df``: the rows it occurs in, among the ``mask``-ed positions); ids never seen get the
    largest value."""
    ids = np.where(np.asarray(mask, bool), np.asarray(tokens), -1).astype(np.int64)
    ids.sort(axis=1)  # each row's ids once: the first of each run of equal ids
    first = np.ones(ids.shape, bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    df = np.bincount(ids[first & (ids >= 0)], minlength=vocab_size)
    return np.log((len(ids) + 1) / (df + 1)).astype(np.float32)


def ngram_codes(tokens, mask, n: int = 1, buckets: int = 0) -> tuple[jax.Array, jax.Array]:
    """The n-grams of orders ``1..n`` of ``tokens`` ``[b, t]`` as bag indices: ``(codes [b, m],
    valid [b, m])``, ``valid`` where all of an n-gram's positions are in ``mask``.

    ``n=1``: the token ids themselves. ``n>1``: each n-gram's 32-bit FNV-1a hash (over its
    order and its ids) modulo ``buckets``, so the bag has a fixed width whatever the vocabulary
    (character n-grams of languages never seen in training included); two n-grams share a bucket
    with probability ``1 / buckets``.
    """
    if n == 1:
        return jnp.asarray(tokens), jnp.asarray(mask, bool)
    if buckets < 1:
        raise ValueError(f"n={n} hashes n-grams into buckets: pass buckets >= 1, not {buckets}.")
    tokens, mask = jnp.asarray(tokens).astype(jnp.uint32), jnp.asarray(mask, bool)
    prime = jnp.uint32(16777619)
    codes, valid = [], []
    for order in range(1, n + 1):
        length = tokens.shape[1] - order + 1
        h = jnp.full((tokens.shape[0], length), 2166136261 ^ order, jnp.uint32)
        ok = jnp.ones((tokens.shape[0], length), bool)
        for i in range(order):  # uint32 products wrap around: the hash, not an overflow
            h = (h ^ tokens[:, i : i + length]) * prime
            ok = ok & mask[:, i : i + length]
        codes.append((h % jnp.uint32(buckets)).astype(jnp.int32))
        valid.append(ok)
    return jnp.concatenate(codes, 1), jnp.concatenate(valid, 1)


def _unit(x):
    # x / |x| along the last axis, through rsqrt(|x|^2 + tiny): differentiable at 0, unlike a norm
    return x * jax.lax.rsqrt(jnp.sum(x**2, -1, keepdims=True) + 1e-12)


def mean_pooled(encode_fn: EncodeFn) -> EncodeFn:
    """``encode_fn`` whose pooled vector is the mean of the sequence output over the real
    (``mask``) tokens instead of its own (e.g. BERT's pooler on the first token)."""

    def encode(p, tokens, mask):
        seq, _ = encode_fn(p, tokens, mask)
        weights = mask.astype(seq.dtype)[..., None]
        return seq, jnp.sum(seq * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)

    return encode


def with_bag_of_words(
    encode_fn: EncodeFn, encoder_params: PyTree, idf: np.ndarray, ngram: int = 1, scale: float = 4.0
) -> tuple[EncodeFn, dict]:
    """Adds a lexical part to the pooled vector: ``(encode_fn', {"encoder": ..., "bow": ...})``.

    The new pooled vector is ``[unit(pooled), scale * unit(sum_t w(token_t))]`` (``unit``: divided
    by its L2 norm): the encoder's vector, and a bag of token ids (a one-hot sum over the real
    tokens, ``len(idf)`` wide) where each token counts with weight ``w = softplus(a * idf[token]
    + b)``. With ``ngram > 1`` the bag holds the n-grams of orders ``1..ngram`` instead, hashed
    into ``len(idf)`` buckets (:func:`ngram_codes`; ``idf`` then per bucket): for character
    tokens, the features of a character n-gram language identifier. ``a``, ``b`` and ``scale``
    are learned. ``a = 0`` at the start, so every token weighs 1 and the lexical part alone,
    under a prototype head, is close to the bag-of-words nearest centroid floor (Euclidean to the
    mean, not cosine to the normalised mean). Because the weight is a function of a token's
    corpus statistics rather than of its identity, what meta-training learns about it transfers
    to classes (and tokens) never seen in training: Bao et al. 2020's "distributional
    signatures", reduced to one feature. Both parts have unit norm, so ``scale`` (its initial
    value) sets their balance; at 4 the lexical part dominates the distances at the start.
    """
    idf = jnp.asarray(idf)
    width = idf.shape[0]

    def encode(p, tokens, mask):
        seq, pooled = encode_fn(p["encoder"], tokens, mask)
        bow = p["bow"]
        codes, valid = ngram_codes(tokens, mask, ngram, width)
        weights = jax.nn.softplus(bow["idf_slope"] * idf[codes] + bow["bias"])
        weights = jnp.where(valid, weights, 0).astype(pooled.dtype)
        rows = jnp.arange(tokens.shape[0])[:, None]
        bag = jnp.zeros((tokens.shape[0], width), pooled.dtype).at[rows, codes].add(weights)
        return seq, jnp.concatenate([_unit(pooled), bow["scale"] * _unit(bag)], -1)

    bow = {
        "idf_slope": jnp.zeros(()),
        "bias": jnp.asarray(np.log(np.e - 1.0), jnp.float32),  # softplus(bias) = 1
        "scale": jnp.asarray(scale, jnp.float32),
    }
    return encode, {"encoder": encoder_params, "bow": bow}


def _check_labels(labels, ways: int) -> None:
    """Integer labels in ``[0, ways)``: checked at trace time (dtype) and, where the labels are
    concrete (not traced), by value. Traced labels out of range give a NaN loss (never a wrapped
    or clipped class), which ``step`` skips and :func:`metaflax.check_finite` reports."""
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(
            f"labels must be integer class ids in [0, {ways}), got dtype "
            f"{jnp.result_type(labels)}; convert them (e.g. labels.astype(jnp.int32))."
        )
    if not isinstance(labels, jax.core.Tracer):
        values = np.asarray(labels)
        bad = values[(values < 0) | (values >= ways)]
        if bad.size:
            raise ValueError(
                f"labels must be in [0, {ways}) (the head has {ways} classes), got "
                f"{sorted(set(bad.tolist()))[:5]}; number the classes 0..{ways - 1}."
            )


def _cross_entropy(logits, labels, weights):
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    nll = -jnp.take_along_axis(logp, labels[:, None], 1, mode="clip")[:, 0]
    nll = jnp.where((labels >= 0) & (labels < logits.shape[-1]), nll, jnp.nan)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def classifier_logits(encode_fn: EncodeFn, params, tokens, mask) -> jax.Array:
    """``pooled @ head.kernel + head.bias``: the classifier's logits ``[n, ways]``."""
    _, pooled = encode_fn(params["encoder"], tokens, mask)
    return pooled @ params["head"]["kernel"] + params["head"]["bias"][None]


def classification_loss_fn(encode_fn: EncodeFn) -> Callable:
    """``loss_fn`` for batches ``{"tokens", "mask", "label"}`` (optional ``"weight"`` per row).

    Logits are ``pooled @ head.kernel + head.bias``; reports accuracy.
    """

    def loss_fn(params, batch, key):
        del key
        logits = classifier_logits(encode_fn, params, batch["tokens"], batch["mask"])
        _check_labels(batch["label"], logits.shape[-1])
        weights = batch.get("weight", jnp.ones(logits.shape[:1], logits.dtype))
        loss = _cross_entropy(logits, batch["label"], weights)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(logits.dtype)
        accuracy = jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return loss, {"accuracy": accuracy}

    return loss_fn


def init_ridge(lam: float = 1.0, scale: float = 10.0) -> dict:
    """The meta-parameters of the ridge head, ``params["ridge"]``: ``log_lambda`` (the
    regularisation) and ``log_scale`` (the logits' scale), learned in log space."""
    return {
        "log_lambda": jnp.asarray(np.log(lam), jnp.float32),
        "log_scale": jnp.asarray(np.log(scale), jnp.float32),
    }


def ridge_head(features, labels, ways: int, ridge: dict) -> dict:
    """The closed-form ridge-regression classifier of one support set: ``{"kernel", "bias"}``.

    With ``X`` the features ``[n, h]`` with a column of ones appended (the bias) and ``Y`` the
    one-hot labels ``[n, ways]``, ``W = X^T (X X^T + lam I)^-1 Y``, the minimiser of
    ``|X W - Y|^2 + lam |W|^2``: the same as ``(X^T X + lam I)^-1 X^T Y`` (Woodbury), but an
    ``n x n`` solve (a Cholesky factorisation) for ``n`` support examples, cheap for few shots
    whatever ``h``. ``lam = exp(ridge["log_lambda"])``; the head's logits are
    ``exp(ridge["log_scale"]) * X_query W``. Differentiable in the features and both
    meta-parameters (R2D2, Bertinetto et al. 2019).
    """
    x = jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], -1)
    y = jax.nn.one_hot(labels, ways, dtype=x.dtype)
    lam = jnp.exp(ridge["log_lambda"]).astype(x.dtype)
    gram = x @ x.T + lam * jnp.eye(x.shape[0], dtype=x.dtype)
    w = jnp.exp(ridge["log_scale"]).astype(x.dtype) * (
        x.T @ jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), y)
    )
    return {"kernel": w[:-1], "bias": w[-1]}


def classifier_task_init(encode_fn: EncodeFn, head_init: str, ways: int) -> Callable | None:
    """The ``task_init`` for ``head_init`` in :data:`HEAD_INITS` (``"ridge"`` reads its
    meta-parameters from ``params["ridge"]``, see :func:`init_ridge`)."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init={head_init!r} is not valid; use one of {HEAD_INITS}.")
    if head_init == "learned":
        return None

    def task_init(params, support):
        head = params["head"]
        if head_init == "zero":
            head = jax.tree.map(jnp.zeros_like, head)
        elif head_init == "ridge":
            if "ridge" not in params:
                raise KeyError(
                    "head_init='ridge' reads its regularisation and scale from params['ridge']: "
                    "add it, params = {**params, 'ridge': heads.init_ridge()}."
                )
            _, pooled = encode_fn(params["encoder"], support["tokens"], support["mask"])
            head = ridge_head(pooled, support["label"], ways, params["ridge"])
        else:
            _, pooled = encode_fn(params["encoder"], support["tokens"], support["mask"])
            onehot = jax.nn.one_hot(support["label"], ways, dtype=pooled.dtype)  # [n, ways]
            protos = (onehot.T @ pooled) / jnp.maximum(onehot.sum(0), 1.0)[:, None]
            head = {"kernel": 2.0 * protos.T, "bias": -jnp.sum(protos**2, -1)}
        return {**params, "head": head}

    return task_init


# ----------------------------------------------------------------------------------------------
# Extractive QA: a start/end span head.


def init_span_head(encoder_params: PyTree, hidden: int) -> dict:
    return {
        "encoder": encoder_params,
        "span": {"kernel": jnp.zeros((hidden, 2)), "bias": jnp.zeros(2)},
    }


def span_logits(encode_fn: EncodeFn, params, tokens, mask):
    """Start and end logits ``[b, t]`` each; positions outside ``mask`` get a very low score."""
    seq, _ = encode_fn(params["encoder"], tokens, mask)
    logits = seq @ params["span"]["kernel"] + params["span"]["bias"][None, None]
    logits = jnp.where(mask[..., None], logits, -1e9)
    return logits[..., 0], logits[..., 1]


def best_spans(start_logits, end_logits, max_answer_len: int = 30):
    """The argmax span with ``start <= end < start + max_answer_len``, per row."""
    t = start_logits.shape[-1]
    scores = start_logits[:, :, None] + end_logits[:, None, :]  # [b, start, end]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    valid = (j >= i) & (j < i + max_answer_len)
    flat = jnp.where(valid[None], scores, -jnp.inf).reshape(scores.shape[0], -1)
    best = jnp.argmax(flat, -1)
    return best // t, best % t


def span_loss_fn(encode_fn: EncodeFn, max_answer_len: int = 30) -> Callable:
    """``loss_fn`` for ``{"tokens", "mask", "start", "end"}``; token-level exact match and F1."""

    def loss_fn(params, batch, key):
        del key
        start_logits, end_logits = span_logits(encode_fn, params, batch["tokens"], batch["mask"])
        ones = jnp.ones(start_logits.shape[:1], start_logits.dtype)
        loss = 0.5 * (
            _cross_entropy(start_logits, batch["start"], ones)
            + _cross_entropy(end_logits, batch["end"], ones)
        )
        s, e = best_spans(start_logits, end_logits, max_answer_len)
        exact = ((s == batch["start"]) & (e == batch["end"])).astype(loss.dtype)
        overlap = jnp.maximum(0, jnp.minimum(e, batch["end"]) - jnp.maximum(s, batch["start"]) + 1)
        precision = overlap / (e - s + 1)
        recall = overlap / (batch["end"] - batch["start"] + 1)
        f1 = jnp.where(overlap > 0, 2 * precision * recall / (precision + recall + 1e-9), 0.0)
        return loss, {"exact_match": jnp.mean(exact), "f1": jnp.mean(f1)}

    return loss_fn


def _normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """SQuAD v1.1 exact match and F1 of a predicted answer text against the gold answers.

    >>> squad_scores("the Eiffel Tower", ["Eiffel Tower", "tower"])
    (1.0, 1.0)
    """

    def f1(pred, gold):
        p, g = _normalize_answer(pred).split(), _normalize_answer(gold).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    em = max(float(_normalize_answer(prediction) == _normalize_answer(a)) for a in answers)
    return em, max(f1(prediction, a) for a in answers)
