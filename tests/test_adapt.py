"""The fine-tune stage: export round trip, the adapt command on files, bad input."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import adapt, checkpoints, fewshot, training
from experiments import families as fam
from experiments.configs import cldr as cldr_config
from metaflax.data import cldr


def _config(**fields):
    config = cldr_config.get_config("runlocal")
    config.languages.min_cldr_terms = 900
    config.languages.num_test = 8
    config.update(dict(num_steps=6, checkpoint_every=6, log_every=3, **fields))
    config.eval.update(shots=(1,), num_episodes=4, val_episodes=4, chunk=4, batch=4)
    return config


def test_the_fine_tune_stage(tmp_path, capsys):
    """One tiny training run (compiles are the cost), then every check of the exports; the
    learned inner optimizer and R2D2 (meta-parameters beside the model) go through the trainer
    in the same run, MAML++ and iMAML as the trainer builds them (their steps traced)."""
    workdir = tmp_path / "run"
    newer = ("learned_opt", "r2d2")
    config = _config(methods=("meta_sgd", "protonet", *newer))
    results = fewshot.train_and_evaluate(config, str(workdir))
    for method in newer:
        scores = results["methods"][method]["scores"]["cldr"]
        assert 0.2 < scores["1-shot/1-step"]["accuracy"]["mean"] <= 1, method
    r2d2 = results["methods"]["r2d2"]["scores"]["cldr"]  # the ridge head, no gradient steps
    assert r2d2["1-shot/0-step"] == r2d2["1-shot/1-step"]
    family = fam.make_family(config)
    params = training.merged_params({"cldr": family})
    for method in ("mamlpp", "imaml"):
        cfg = training.method_config(config, method)
        alg = training.make_algorithm(method, family.loss_fn, family.method_init(method), cfg)
        state = alg.init(params)
        _, metrics = jax.eval_shape(alg.step, state, family.meta_batch(0, 0, 2), jax.random.key(0))
        assert metrics["loss"].shape == (), method
    for method in ("meta_sgd", "learned_opt", "r2d2"):  # protonet: in the adapt command
        _check_round_trip(config, family, workdir, method)
    _check_adapt_command(family, workdir, tmp_path, capsys)
    _check_ways(family, workdir)
    _check_bad_exports(workdir, tmp_path)


def _write(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return str(path)


def _task(languages, shots, seed=0):
    """``shots`` terms of each language for the support set, the next 10 to label."""
    texts, labels, names = cldr.language_id_examples(languages)
    rng = np.random.default_rng(seed)
    support, query = [], []
    for c, name in enumerate(names):
        rows = rng.permutation(np.flatnonzero(labels == c))
        support += [(texts[i], name) for i in rows[:shots]]
        query += [(texts[i], name) for i in rows[shots : shots + 10]]
    return support, query


def _check_round_trip(config, family, workdir, method):
    """Adapting from the export gives the predictions of adapting from the checkpoint."""
    clf = adapt.load(str(workdir / "export" / method))
    cfg = training.method_config(config, method)
    params = training.model_params(method, cfg, training.merged_params({"cldr": family}))
    alg = training.make_algorithm(method, family.loss_fn, family.method_init(method), cfg)
    abstract = jax.eval_shape(alg.init, params)
    mngr, state, _ = checkpoints.restore_latest(
        str(workdir / "checkpoints" / method), abstract, keep=2
    )
    mngr.close()
    restored = state.meta_params
    for a, b in zip(jax.tree.leaves(clf.meta_params), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    support, query = _task(family.info["test_class_names"][:5], shots=2)
    texts = [t for t, _ in query]
    ours = adapt.predict(clf, adapt.fit(clf, *zip(*support, strict=True)), texts)
    ckpt = clf._replace(meta_params=jax.tree.map(np.asarray, restored))
    theirs = adapt.predict(ckpt, adapt.fit(ckpt, *zip(*support, strict=True)), texts)
    assert ours[0] == theirs[0]
    np.testing.assert_array_equal(ours[1], theirs[1])


def _check_adapt_command(family, workdir, tmp_path, capsys):
    languages = family.info["test_class_names"]
    for ways in (3, len(languages)):  # any number of classes, not only the trained 5
        support, query = _task(languages[:ways], shots=5)
        args = [
            "--model", str(workdir / "export" / "meta_sgd"),
            "--support", _write(tmp_path / "support.jsonl", support),
            "--texts", _write(tmp_path / "texts.jsonl", query),
            "--out", str(tmp_path / f"pred{ways}.jsonl"),
        ]  # fmt: skip
        if ways != 5:
            with pytest.raises(ValueError, match=r"learned a 5-way head .* per-parameter"):
                adapt.main(args)
            args[1] = str(workdir / "export" / "protonet")
        out = adapt.main(args)
        rows = [json.loads(x) for x in open(tmp_path / f"pred{ways}.jsonl")]
        assert len(rows) == len(query) == out["texts"]
        assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)
        correct = np.mean([r["label"] == y for r, (_, y) in zip(rows, query, strict=True)])
        assert out["accuracy"] == pytest.approx(correct) and out["ci95"] > 0
        assert out["accuracy"] > 1.5 / ways  # above chance
    assert "accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        adapt.main(args)
    (tmp_path / "empty.jsonl").write_text("")
    args[args.index("--texts") + 1] = str(tmp_path / "empty.jsonl")
    assert adapt.main([*args, "--overwrite"])["texts"] == 0
    assert (tmp_path / f"pred{ways}.jsonl").read_text() == ""


def _check_bad_exports(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a metaflax export"):
        adapt.load(str(tmp_path))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(workdir / "export" / "meta_sgd", broken)
    (broken / adapt.EXTRAS).write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="damaged export"):
        adapt.load(str(broken))
    shutil.copy(workdir / "export" / "protonet" / adapt.EXTRAS, broken / adapt.EXTRAS)
    with pytest.raises(ValueError, match=r"inner_lr.* missing|do not fit|unknown parameters"):
        adapt.load(str(broken))
    assert os.path.isfile(workdir / "export" / "protonet" / adapt.SETTINGS)


def _check_ways(family, workdir):
    """Accuracy against the number of classes: above chance, the same numbers again (fixed
    seed), and one error where the file has too few classes."""
    from experiments import ways

    clf = adapt.load(str(workdir / "export" / "protonet"))
    languages = family.info["test_class_names"]
    texts, labels, names = cldr.language_id_examples(languages)
    labels = [names[i] for i in labels]
    for n in (3, 0):
        mean, ci = ways.accuracy_vs_ways(clf, texts, labels, n, 2, 3, episodes=3)
        assert mean > 1.5 / (n or len(languages)) and ci >= 0
        assert ways.accuracy_vs_ways(clf, texts, labels, n, 2, 3, episodes=3) == (mean, ci)
    with pytest.raises(ValueError, match=r"9 ways, but only 8 classes .* lower --ways"):
        ways.accuracy_vs_ways(clf, texts, labels, 9, 2, 3, episodes=1)
    timing = ways.time_to_label(clf, texts, labels, shots=2, num_texts=50)
    assert timing["classes"] == len(languages) and timing["texts"] == 50
    assert timing["first_seconds"] > 0 and timing["seconds"] > 0
