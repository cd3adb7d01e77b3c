"""A workdir belongs to one run: refused to another config and to a second process, files
written whole, checkpoints of another config refused."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import metaflax as mf
from experiments import checkpoints, fewshot
from experiments import workdir as wd
from experiments.configs import cldr as cldr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**fields):
    config = cldr_config.get_config("runlocal")
    config.update(fields)
    return config


def test_settings_hold_what_changes_results():
    a = _config()
    assert wd.fingerprint(a) == wd.fingerprint(_config(methods=("maml",), checkpoint_every=7))
    b = _config(seed=1)
    b.model.hidden = 32
    assert wd.fingerprint(a) != wd.fingerprint(b)
    assert {"seed", "model.hidden", "eval.shots"} <= set(wd.settings(a))
    assert not {"methods", "data_dir", "quiet"} & set(wd.settings(a))
    # A field added later changes nothing at the value that does what runs did before it.
    assert "model.train_layers" not in wd.settings(a)  # -1: the whole encoder, as before
    c = _config()
    c.model.train_layers = 1
    assert wd.settings(c)["model.train_layers"] == 1 and wd.fingerprint(c) != wd.fingerprint(a)


def test_another_config_is_refused_naming_the_fields(tmp_path):
    with wd.claim(str(tmp_path), _config()):
        (tmp_path / "methods").mkdir()
        (tmp_path / "methods" / "maml.json").write_text("{}")
    other = _config(seed=3)
    other.model.hidden = 48
    # The trainer refuses before reading any data; nothing is touched.
    with pytest.raises(ValueError, match=r"model.hidden: 32 there, 48 now; seed: 0 there, 3 now"):
        fewshot.train_and_evaluate(other, str(tmp_path))
    assert (tmp_path / "methods" / "maml.json").exists()
    with wd.claim(str(tmp_path), _config(methods=("reptile",))):  # same run, more methods
        pass
    with wd.claim(str(tmp_path), other, overwrite=True):
        assert sorted(os.listdir(tmp_path)) == [wd.LOCK_FILE, wd.RUN_FILE]
    stored = json.loads((tmp_path / wd.RUN_FILE).read_text())
    assert stored["fingerprint"] == wd.fingerprint(other)


def test_a_workdir_from_before_run_json_resumes_with_its_own_config(tmp_path):
    (tmp_path / "config.json").write_text(_config().to_json(indent=2))  # an older trainer's
    with wd.claim(str(tmp_path), _config()):
        pass
    assert (tmp_path / wd.RUN_FILE).exists()
    (tmp_path / wd.RUN_FILE).unlink()
    with pytest.raises(ValueError, match=r"another config \(its config.json differs\)"):
        with wd.claim(str(tmp_path), _config(seed=5)):
            pass


def test_foreign_files_and_urls_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"files of another run or program \(notes.txt\)"):
        with wd.claim(str(tmp_path), _config()):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"is a URL; .*\(mount the bucket"):
        with wd.claim("gs://bucket/run", _config()):
            pass


def test_a_second_process_is_refused(tmp_path):
    """The lock is held by the running process and dies with it (SIGKILL included)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"""
import sys, time
from experiments import workdir as wd
from experiments.configs import cldr
with wd.claim({str(tmp_path)!r}, cldr.get_config("runlocal")):
    print("held", flush=True)
    time.sleep(60)
"""],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="in use by another run"):
            with wd.claim(str(tmp_path), _config()):
                pass
    finally:
        holder.kill()
        holder.wait()
    with wd.claim(str(tmp_path), _config()):  # free again after the kill
        pass


def test_files_are_written_whole(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    wd.write_json(str(path), {"a": 1})

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        wd.write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open(path, "w") makes it
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left


def test_a_checkpoint_of_another_config_is_an_error_not_damage(tmp_path):
    params = {"w": jnp.arange(3.0)}
    state = mf.MetaState(params, optax.sgd(0.1).init(params), jnp.zeros((), jnp.int32))
    directory = str(tmp_path / "ckpt")
    mngr = checkpoints.manager(directory, keep=2)
    meta = {"fingerprint": "aaaa", "step": 1, "curve": [], "seconds": 0.0}
    checkpoints.save(mngr, 1, state, meta)
    mngr.wait_until_finished()
    mngr.close()
    abstract = jax.eval_shape(lambda: state)
    with pytest.raises(checkpoints.ForeignCheckpoint, match="written by another config"):
        checkpoints.restore_latest(directory, abstract, keep=2, fingerprint="bbbb")
    assert os.listdir(directory) == ["1"] and not os.path.exists(directory + ".corrupt")
    mngr, restored, _ = checkpoints.restore_latest(directory, abstract, keep=2, fingerprint="aaaa")
    mngr.close()
    assert int(restored.step) == 0


def test_a_failed_checkpoint_write_names_the_directory_and_keeps_the_last_good_one(tmp_path):
    params = {"w": jnp.arange(3.0)}
    state = mf.MetaState(params, optax.sgd(0.1).init(params), jnp.zeros((), jnp.int32))
    mngr = checkpoints.manager(str(tmp_path / "ckpt"), keep=2)
    checkpoints.save(mngr, 1, state, {"step": 1})
    checkpoints.wait(mngr)

    def disk_full(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device")

    mngr.save = disk_full  # what orbax raises when the disk is full
    with pytest.raises(checkpoints.CheckpointWriteError) as error:
        checkpoints.save(mngr, 2, state, {"step": 2})
    message = str(error.value)
    assert str(tmp_path / "ckpt") in message and "No space left on device" in message
    assert "last good checkpoint (step 1) is kept" in message
    mngr.close()


def test_default_workdirs_keep_users_runs_apart():
    from experiments.configs import clinc150

    assert fewshot.default_workdir(_config()) == "workdirs/cldr"
    config = clinc150.get_config()
    assert fewshot.default_workdir(config) == "workdirs/clinc150"
    config.dataset = "/data/banking.jsonl"
    assert fewshot.default_workdir(config) == "workdirs/clinc150_banking"
    config.dataset, config.test_dataset = "clinc150+fewrel", "/data/huffpost_test.jsonl"
    assert fewshot.default_workdir(config) == "workdirs/clinc150_clinc150+fewrel_to_huffpost_test"
