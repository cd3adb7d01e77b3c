"""A pretrained encoder's frozen trunk computed once: the same model, the same meta-gradients,
the cache on disk, and the trainer and the fine-tune stage on it."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import metaflax as mf
from metaflax import bert, heads

CFG = bert.BertConfig.tiny(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=20,
)


def _batch(n, seed=0, ways=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (n, 12)).astype(np.int32)
    mask = np.arange(12)[None] < rng.integers(3, 13, (n, 1))  # padded rows
    return ids, mask, (np.arange(n) % ways).astype(np.int32)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_top_on_the_trunk_is_the_encoder(k):
    encoder = bert.BertEncoder(CFG, rngs=nnx.Rngs(0))
    apply_fn, params = mf.functionalize(encoder)
    cut = bert.freeze_trunk(encoder, k)
    ids, mask, _ = _batch(5)
    seq, pooled = cut.top_fn(cut.top_params, cut.trunk_fn(ids, mask), mask)
    want_seq, want_pooled = apply_fn(params, ids, mask)
    np.testing.assert_allclose(seq, want_seq, atol=2e-6)
    np.testing.assert_allclose(pooled, want_pooled, atol=2e-6)
    assert len(cut.top_params.get("layers", {})) == k
    merged = cut.merge(cut.top_params)  # the whole encoder back, bit for bit
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="between 0 and num_hidden_layers=3"):
        bert.freeze_trunk(encoder, 4)


def test_meta_gradients_on_cached_features_equal_the_full_forward_pass():
    """MAML on the top over cached trunk outputs = MAML on the whole encoder with the trunk
    frozen (the top's parameters inserted into the full ones), up to float rounding."""
    encoder = bert.BertEncoder(CFG, rngs=nnx.Rngs(1))
    apply_fn, _ = mf.functionalize(encoder)
    cut = bert.freeze_trunk(encoder, 1)

    def pooled_fn(encode):
        return lambda p, x, m: (None, encode(p, x, m)[1])

    top = pooled_fn(cut.top_fn)
    whole = pooled_fn(lambda p, ids, m: apply_fn(cut.merge(p), ids, m))
    cached, full = heads.classification_loss_fn(top), heads.classification_loss_fn(whole)
    init = heads.classifier_task_init(top, "proto", 3)
    init_full = heads.classifier_task_init(whole, "proto", 3)
    params = heads.init_classifier(cut.top_params, CFG.hidden_size, 3)
    ids, mask, labels = _batch(24, seed=2)
    feats = bert.trunk_features(cut, ids, mask, batch_size=10)  # 3 batches, the last padded

    def episode(x):
        support = {"tokens": x[:12], "mask": mask[:12], "label": labels[:12]}
        query = {"tokens": x[12:], "mask": mask[12:], "label": labels[12:]}
        return jax.tree.map(lambda a: a[None], mf.Episode(support, query))

    grads = []
    for loss_fn, task_init, x in ((cached, init, feats), (full, init_full, ids)):
        alg = mf.maml(
            loss_fn,
            inner_tx=optax.sgd(0.1),
            outer_tx=optax.adam(1e-3),
            num_inner_steps=2,
            task_init=task_init,
        )
        grads.append(jax.jit(alg.meta_grad)(params, episode(x), jax.random.key(0)))
    (g_cached, aux_cached), (g_full, aux_full) = grads
    np.testing.assert_allclose(aux_cached["loss"], aux_full["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_cached), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_trunk_features_are_cached_per_model_and_data(tmp_path):
    encoder = bert.BertEncoder(CFG, rngs=nnx.Rngs(0))
    cut = bert.freeze_trunk(encoder, 1)
    ids, mask, _ = _batch(7)
    first = bert.trunk_features(cut, ids, mask, cache_dir=str(tmp_path))
    (path,) = tmp_path.iterdir()
    again = bert.trunk_features(cut, ids, mask, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, np.asarray(cut.trunk_fn(ids, mask)))
    os.utime(path, (0, 0))
    # Other data, another cut or other weights: another file.
    bert.trunk_features(cut, ids[:, ::-1].copy(), mask, cache_dir=str(tmp_path))
    bert.trunk_features(bert.freeze_trunk(encoder, 2), ids, mask, cache_dir=str(tmp_path))
    other = bert.BertEncoder(CFG, rngs=nnx.Rngs(5))
    bert.trunk_features(bert.freeze_trunk(other, 1), ids, mask, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 4
    # A damaged file is computed again, not trusted.
    path.write_bytes(b"not an array")
    np.testing.assert_array_equal(
        bert.trunk_features(cut, ids, mask, cache_dir=str(tmp_path)), first
    )
    with pytest.raises(ValueError, match="same \\[n, seq\\] shape"):
        bert.trunk_features(cut, ids, mask[:, :5])


def test_the_trainer_and_the_fine_tune_stage_on_a_frozen_trunk(tmp_path):
    """``model.train_layers=1``: only the top block (and head) is meta-trained; the export is
    the whole encoder (the frozen blocks as loaded), and the fine-tune stage reads it. (MAML's
    meta-gradient on the cut model is checked above; the trainer runs ProtoNet, the cheapest.)"""
    import transformers

    from experiments import adapt, fewshot
    from experiments.configs import cldr as cldr_config
    from metaflax.data import cldr, text_sources

    texts = cldr.language_id_examples(["de", "fr", "it"])[0]
    tokenizer = text_sources.train_wordpiece(texts, vocab_size=400)
    cfg = bert.BertConfig.tiny(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4
    )
    _, params = mf.functionalize(bert.BertEncoder(cfg, rngs=nnx.Rngs(3)))
    bert.save_pretrained(str(tmp_path / "bert"), params, cfg, tokenizer)

    config = cldr_config.get_config("runlocal")
    config.languages.min_cldr_terms = 900
    config.languages.num_test = 8
    config.update(dict(methods=("protonet",), tokenizer="hf", num_steps=4, ngram=1))
    config.model.update(hf_path=str(tmp_path / "bert"), train_layers=1, pool="mean")
    config.eval.update(shots=(1,), num_episodes=4, val_episodes=4, chunk=4, batch=4)
    results = fewshot.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["methods"]["protonet"]["scores"]["cldr"]["1-shot/1-step"]["accuracy"]["mean"]

    export = str(tmp_path / "run" / "export" / "protonet")
    hf = transformers.AutoModel.from_pretrained(export)
    frozen = hf.encoder.layer[0].attention.output.dense.weight.detach().numpy()
    np.testing.assert_array_equal(frozen.T, params["layers"][0]["attention_output"]["kernel"])
    top = hf.encoder.layer[1].attention.output.dense.weight.detach().numpy()
    assert not np.array_equal(top.T, params["layers"][1]["attention_output"]["kernel"])
    clf = adapt.load(export)
    fitted = adapt.fit(clf, texts[:9], ["a", "b", "c"] * 3)
    predicted, probs = adapt.predict(clf, fitted, texts[9:14])
    assert len(predicted) == 5 and np.allclose(probs.sum(1), 1, atol=1e-5)
    with open(os.path.join(export, "metaflax.json")) as f:
        settings = json.load(f)
    assert settings["config"]["model"]["train_layers"] == 1
    with pytest.raises(ValueError, match="train_layers=1 trains the top blocks"):
        bad = cldr_config.get_config("runlocal")
        bad.model.train_layers = 1
        fewshot.train_and_evaluate(bad, str(tmp_path / "bad"))
