"""Task heads and the seq2seq model: closed forms and overfitting oracles."""

import collections

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from flax import nnx

import metaflax as mf
from metaflax import bert, heads, seq2seq

CFG = bert.BertConfig.tiny(
    vocab_size=64,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
)


def _encoder():
    return mf.functionalize(bert.BertEncoder(CFG, rngs=nnx.Rngs(0)))


def _batch(n=6, ways=3, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (n, 12), 1, 64)
    return {
        "tokens": tokens,
        "mask": jnp.arange(12)[None].repeat(n, 0) < 10,
        "label": jnp.arange(n) % ways,
    }


def _train(loss_fn, params, batch, steps, lr=1e-3):
    tx = optax.adam(lr)

    @jax.jit
    def step(p, s):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, None)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss, m

    state = tx.init(params)
    for _ in range(steps):
        params, state, loss, metrics = step(params, state)
    return params, loss, metrics


def test_proto_head_is_the_nearest_prototype_classifier():
    encode, enc = _encoder()
    params = heads.init_classifier(enc, 32, 3)
    support = _batch()
    init = heads.classifier_task_init(encode, "proto", 3)(params, support)
    _, pooled = encode(enc, support["tokens"], support["mask"])
    protos = jnp.stack([pooled[support["label"] == c].mean(0) for c in range(3)])
    logits = pooled @ init["head"]["kernel"] + init["head"]["bias"][None]
    # 2 x.mu - |mu|^2 = |x|^2 - |x - mu|^2: the same ranking as the negative squared distance
    dist = -jnp.sum((pooled[:, None] - protos[None]) ** 2, -1)
    row_norm = jnp.sum(pooled**2, -1, keepdims=True)
    np.testing.assert_allclose(logits, dist + row_norm, rtol=1e-4, atol=1e-4)
    zero = heads.classifier_task_init(encode, "zero", 3)(init, support)
    assert not any(bool(jnp.any(x)) for x in jax.tree.leaves(zero["head"]))
    assert heads.classifier_task_init(encode, "learned", 3) is None
    with pytest.raises(ValueError, match="head_init='protos' is not valid"):
        heads.classifier_task_init(encode, "protos", 3)


def test_labels_outside_the_classes_are_an_error_or_nan_never_another_class():
    encode, enc = _encoder()
    params = heads.init_classifier(enc, 32, 3)
    loss_fn = heads.classification_loss_fn(encode)
    batch = _batch()
    for label in (3, -1):
        bad = {**batch, "label": batch["label"].at[0].set(label)}
        with pytest.raises(ValueError, match=rf"in \[0, 3\) .* got \[{label}\]; number"):
            loss_fn(params, bad, None)
        assert np.isnan(jax.jit(loss_fn)(params, bad, None)[0])  # traced: NaN, not wrapped
    with pytest.raises(TypeError, match=r"integer class ids .* float32; convert"):
        loss_fn(params, {**batch, "label": batch["label"].astype(jnp.float32)}, None)
    np.testing.assert_allclose(  # in range: the cross-entropy, by hand
        loss_fn(params, batch, None)[0],
        -jnp.mean(
            jax.nn.log_softmax(
                heads.classifier_logits(encode, params, batch["tokens"], batch["mask"])
            )[jnp.arange(6), batch["label"]]
        ),
        rtol=1e-6,
    )


def _proto_maml(encode):
    """One-step Proto-MAML on ``encode`` and a meta-batch of two 3-way episodes."""
    alg = mf.maml(
        heads.classification_loss_fn(encode),
        inner_tx=optax.sgd(0.1),
        outer_tx=optax.sgd(0.1),
        num_inner_steps=1,
        task_init=heads.classifier_task_init(encode, "proto", 3),
    )
    episodes = mf.Episode(*(jax.tree.map(lambda x: x[None], _batch(seed=s)) for s in (0, 1)))
    return alg, episodes


def test_proto_maml_meta_gradient_reaches_the_encoder_through_the_head_init():
    encode, enc = _encoder()
    alg, episodes = _proto_maml(encode)
    grads = jax.jit(jax.grad(lambda p: alg.meta_loss(p, episodes, jax.random.key(0))[0]))(
        heads.init_classifier(enc, 32, 3)
    )
    assert optax.tree.norm(grads["encoder"]) > 0
    assert optax.tree.norm(grads["head"]) == 0  # the head is re-initialised per task


def test_bag_of_words_part_is_the_idf_weighted_normalised_token_count(x64):
    tokens = np.array([[1, 2, 2, 0], [2, 3, 0, 0], [5, 5, 5, 5]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    # df: token 1 in 1 row, 2 in 2, 3 in 1, 5 in 1 (the masked 4th 5 changes nothing), 0 in none
    np.testing.assert_allclose(
        heads.inverse_document_frequency(tokens, mask, 6),
        np.log(4 / (np.array([0, 1, 2, 1, 0, 1]) + 1)),
        rtol=1e-6,
    )
    encode, enc = _encoder()
    enc = jax.tree.map(lambda x: x.astype(jnp.float64), enc)
    idf = np.asarray(jax.random.uniform(jax.random.key(1), (64,), jnp.float64, 0.0, 3.0))
    bow_encode, params = heads.with_bag_of_words(encode, enc, idf, scale=3.0)
    batch = _batch()
    mask = batch["mask"].at[0].set(False)  # row 0: no real tokens
    seq, pooled = bow_encode(params, batch["tokens"], mask)
    seq0, pooled0 = encode(enc, batch["tokens"], mask)
    np.testing.assert_array_equal(seq, seq0)
    norms = np.linalg.norm(pooled0, axis=1, keepdims=True)
    np.testing.assert_allclose(pooled[:, :32], pooled0 / np.where(norms > 0, norms, 1), rtol=1e-9)

    def expected_bag(slope, bias):
        weight = np.log1p(np.exp(slope * idf + bias))  # softplus
        counts = np.zeros((6, 64))
        for i, (row, m) in enumerate(
            zip(np.asarray(batch["tokens"]), np.asarray(mask), strict=True)
        ):
            np.add.at(counts[i], row[m], weight[row[m]])  # repeated tokens add up
        norms = np.linalg.norm(counts, axis=1, keepdims=True)
        return 3.0 * counts / np.where(norms > 0, norms, 1.0)

    # at the start every token weighs 1: plain normalised counts
    np.testing.assert_allclose(pooled[:, 32:], expected_bag(0.0, np.log(np.e - 1)), rtol=1e-9)
    moved = {**params, "bow": {**params["bow"], "idf_slope": jnp.asarray(0.7), "bias": -0.2}}
    _, pooled = bow_encode(moved, batch["tokens"], mask)
    np.testing.assert_allclose(pooled[:, 32:], expected_bag(0.7, -0.2), rtol=1e-9, atol=1e-12)

    # Proto-MAML through it: second-order meta-gradients w.r.t. the weighting match finite
    # differences, also with an empty support row.
    alg, episodes = _proto_maml(bow_encode)
    episodes = episodes._replace(support={**episodes.support, "mask": mask[None]})
    full = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), heads.init_classifier(moved, 96, 3))

    @jax.jit
    def f(bow):
        p = {**full, "encoder": {**full["encoder"], "bow": bow}}
        return alg.meta_loss(p, episodes, jax.random.key(0))[0]

    bow = full["encoder"]["bow"]
    jax.test_util.check_grads(f, (bow,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
    assert all(float(g) != 0 for g in jax.tree.leaves(jax.grad(f)(bow)))


def test_hashed_ngram_bag_has_the_exact_ngram_counts_geometry():
    # Two rows' bags of hashed character 1-3-grams (no collisions among this handful of n-grams
    # in 2**20 buckets) have the same Gram matrix as their exact n-gram count vectors.
    tokens = np.array([[1, 5, 5, 5, 2, 0], [1, 5, 7, 5, 5, 2], [1, 9, 2, 0, 0, 0]])
    mask = tokens > 0
    codes, valid = heads.ngram_codes(tokens, mask, 3, 2**20)
    counts = []
    for row in tokens:
        real = [int(t) for t in row if t > 0]
        grams = [tuple(real[i : i + m]) for m in (1, 2, 3) for i in range(len(real) - m + 1)]
        counts.append(collections.Counter(grams))
    assert np.asarray(valid).sum(1).tolist() == [sum(c.values()) for c in counts]
    distinct = {int(c) for c in np.asarray(codes)[np.asarray(valid)]}
    assert len(distinct) == len(sum(counts, collections.Counter()))  # no collisions
    exact = np.array([[sum(a[g] * b[g] for g in a) for b in counts] for a in counts], float)
    norms = np.sqrt(np.diag(exact))
    encode, enc = _encoder()
    idf = np.zeros(2**20, np.float32)
    bow_encode, params = heads.with_bag_of_words(encode, enc, idf, ngram=3, scale=1.0)
    _, pooled = bow_encode(params, jnp.asarray(tokens), jnp.asarray(mask))
    bag = np.asarray(pooled[:, 32:], np.float64)
    np.testing.assert_allclose(bag @ bag.T, exact / np.outer(norms, norms), rtol=1e-5)
    with pytest.raises(ValueError, match="buckets >= 1"):
        heads.ngram_codes(tokens, mask, 3)


def test_span_head_overfits_one_example():
    encode, enc = _encoder()
    params = heads.init_span_head(enc, 32)
    batch = {
        "tokens": jax.random.randint(jax.random.key(3), (1, 12), 1, 64),
        "mask": jnp.ones((1, 12), bool),
        "start": jnp.array([4]),
        "end": jnp.array([6]),
    }
    loss_fn = heads.span_loss_fn(encode)
    params, _, metrics = _train(loss_fn, params, batch, 60)
    start, end = heads.span_logits(encode, params, batch["tokens"], batch["mask"])
    assert int(jnp.argmax(start)) == 4 and int(jnp.argmax(end)) == 6
    assert float(metrics["exact_match"]) == 1.0 and float(metrics["f1"]) == 1.0


def test_best_spans_respects_order_and_length():
    start = jnp.array([[0.0, 5.0, 0.0, 0.0, 9.0]])
    end = jnp.array([[8.0, 0.0, 1.0, 0.0, 0.0]])
    s, e = heads.best_spans(start, end, max_answer_len=2)  # end 0 < start 1: not allowed
    assert (int(s[0]), int(e[0])) == (4, 4)


def test_squad_scores():
    assert heads.squad_scores("The cat sat", ["the cat sat."]) == (1.0, 1.0)
    em, f1 = heads.squad_scores("cat sat on", ["the cat sat"])
    assert em == 0.0 and f1 == pytest.approx(0.8)


def test_seq2seq_overfits_and_decodes_exactly():
    bos, eos, vocab, length = 1, 2, 20, 8
    model = seq2seq.Seq2Seq(
        vocab, max_len=length, dim=32, num_layers=1, num_heads=2, mlp_dim=64, rngs=nnx.Rngs(0)
    )
    apply_fn, params = mf.functionalize(model)
    src = jnp.array(
        [[5, 6, 7, 0, 0, 0, 0, 0], [8, 9, 10, 11, 0, 0, 0, 0], [12, 5, 0, 0, 0, 0, 0, 0]]
    )
    tgt = jnp.array(
        [[1, 7, 6, 5, 2, 2, 2, 2], [1, 11, 10, 9, 8, 2, 2, 2], [1, 5, 12, 2, 2, 2, 2, 2]]
    )
    tgt_mask = jnp.cumsum(tgt == eos, axis=1) <= 1  # tokens up to and including the first EOS
    batch = {"src": src, "src_mask": src > 0, "tgt": tgt, "tgt_mask": tgt_mask}
    params, _, metrics = _train(seq2seq.seq2seq_loss_fn(apply_fn), params, batch, 150, 3e-3)
    assert float(metrics["token_accuracy"]) == 1.0
    start_fn, _ = mf.functionalize(model, "start_decoding")
    step_fn, _ = mf.functionalize(model, "decode_step")
    decoded = seq2seq.greedy_decode(
        start_fn, step_fn, params, src, src > 0, bos_id=bos, eos_id=eos, max_len=length
    )
    np.testing.assert_array_equal(decoded, tgt)


@pytest.mark.parametrize("shared_encoder", [False, True])
def test_cached_decode_steps_equal_the_full_forward(shared_encoder):
    """Each cached decoding step's logits equal the teacher-forced forward's at that position."""
    b, s, length, vocab = 3, 6, 7, 30
    kw = dict(max_len=length, dim=32, num_layers=2, num_heads=2, mlp_dim=64, rngs=nnx.Rngs(0))
    src = jax.random.randint(jax.random.key(0), (b, s), 3, vocab)
    src_mask = jnp.arange(s)[None] < jnp.array([[6], [4], [2]])
    tgt = jax.random.randint(jax.random.key(1), (b, length), 3, vocab)
    if shared_encoder:  # the Decoder reads another encoder's output: here random memory
        model, inputs = (
            seq2seq.Decoder(vocab, memory_dim=16, **kw),
            jax.random.normal(jax.random.key(2), (b, s, 16)),
        )
    else:
        model, inputs = seq2seq.Seq2Seq(vocab, **kw), src
    apply_fn, params = mf.functionalize(model)
    start_fn, _ = mf.functionalize(model, "start_decoding")
    step_fn, _ = mf.functionalize(model, "decode_step")
    full = apply_fn(params, inputs, src_mask, tgt, jnp.ones_like(tgt, bool))
    state, step = start_fn(params, inputs, src_mask, length), jax.jit(step_fn)
    for i in range(length):
        logits, state = step(params, state, tgt[:, i], i)
        np.testing.assert_allclose(logits, full[:, i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="build the model with a larger max_len"):
        start_fn(params, inputs, src_mask, length + 1)


def test_functionalize_method_names_a_method():
    model = seq2seq.Seq2Seq(
        30, max_len=4, dim=8, num_layers=1, num_heads=2, mlp_dim=8, rngs=nnx.Rngs(0)
    )
    for name in ("decode", "embed"):  # no such method; a parameter, not a method
        with pytest.raises(AttributeError, match=f"has no method '{name}'"):
            mf.functionalize(model, name)


def test_params_of_another_model_are_one_error():
    """A state saved from another model (here: another hidden size) fails at trace time with
    both structures, not deep inside flax."""
    encode, _ = _encoder()
    _, other = mf.functionalize(bert.BertEncoder(CFG.tiny(vocab_size=64), rngs=nnx.Rngs(0)))
    batch = _batch()
    with pytest.raises(ValueError, match=r"params do not fit this BertEncoder: expected"):
        jax.jit(encode)(other, batch["tokens"], batch["mask"])


def test_translation_metrics():
    same = seq2seq.translation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["chrf"] == pytest.approx(100.0) and same["bleu"] == pytest.approx(100.0)
    worse = seq2seq.translation_metrics(["a dog"], ["the cat sat on the mat"])
    assert worse["chrf"] < 30 and worse["bleu"] < 10
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        seq2seq.translation_metrics(["a", "b"], ["a"])


def test_ridge_head_solves_the_normal_equations_and_differentiates(x64):
    """The Woodbury form equals numpy's solve of (X^T X + lam I) W = X^T Y (bias column
    included); its gradient in the features and both meta-parameters matches central
    differences."""
    rng = np.random.default_rng(0)
    features, labels = jnp.asarray(rng.normal(size=(6, 10))), jnp.asarray([0, 1, 2, 0, 1, 2])
    ridge = jax.tree.map(lambda x: x.astype(jnp.float64), heads.init_ridge(lam=0.5, scale=3.0))
    head = heads.ridge_head(features, labels, 3, ridge)
    x = np.concatenate([np.asarray(features), np.ones((6, 1))], 1)
    y = np.eye(3)[np.asarray(labels)]
    lam, scale = np.exp(ridge["log_lambda"]), np.exp(ridge["log_scale"])  # 0.5 and 3.0
    w = scale * np.linalg.solve(x.T @ x + lam * np.eye(11), x.T @ y)
    np.testing.assert_allclose(head["kernel"], w[:-1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(head["bias"], w[-1], rtol=1e-9, atol=1e-12)

    query = jnp.asarray(rng.normal(size=(4, 10)))

    def score(f, r):  # a query loss through the head
        h = heads.ridge_head(f, labels, 3, r)
        return jnp.sum(jax.nn.log_softmax(query @ h["kernel"] + h["bias"][None])[:, 0])

    grads = jax.grad(score, argnums=(0, 1))(features, ridge)
    eps = 1e-6
    direction = jnp.asarray(rng.normal(size=features.shape))
    fd = (score(features + eps * direction, ridge) - score(features - eps * direction, ridge)) / (
        2 * eps
    )
    np.testing.assert_allclose(jnp.vdot(grads[0], direction), fd, rtol=1e-6)
    for name in ("log_lambda", "log_scale"):
        up, down = ({**ridge, name: ridge[name] + s * eps} for s in (1, -1))
        fd = (score(features, up) - score(features, down)) / (2 * eps)
        np.testing.assert_allclose(grads[1][name], fd, rtol=1e-6, err_msg=name)
    task_init = heads.classifier_task_init(lambda p, t, m: (None, t), "ridge", 3)
    with pytest.raises(KeyError, match=r"heads\.init_ridge"):
        task_init({"encoder": {}, "head": {}}, {"tokens": features, "mask": None, "label": labels})
