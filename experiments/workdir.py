"""A workdir belongs to one run: the config that made it, a lock while a process uses it, and
files written whole (a temporary file renamed into place) so that a kill leaves the old or the
new version, never half of one."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile

import ml_collections

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# Fields that do not change any result: where the data is read from, which methods this
# invocation runs (each method's results are its own), reporting and checkpoint cadence.
IGNORED = ("name", "methods", "data_dir", "quiet", "checkpoint_every", "checkpoints_to_keep")
# Fields added after workdirs existed, with the value that does what runs did before them: at
# that value a field is left out of the settings, so older workdirs and checkpoints still match.
ADDED_LATER = {"model.train_layers": -1}


def write_text(path: str, text: str) -> None:
    """Writes ``path`` atomically: a reader (or a rerun after a kill) sees all of it or the
    previous version."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, obj, indent: int | None = None) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = list(value) if isinstance(value, tuple) else value
    return out


def settings(config) -> dict:
    """The config's fields that change results, flattened (``model.hidden``: 64, ...)."""
    flat = _flat(json.loads(config.to_json()))
    return {
        k: v
        for k, v in sorted(flat.items())
        if k.split(".")[0] not in IGNORED and not (k in ADDED_LATER and ADDED_LATER[k] == v)
    }


def fingerprint(config) -> str:
    """A short hash of :func:`settings`: stored with every checkpoint and result."""
    text = json.dumps(settings(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def claim(workdir: str, config, overwrite: bool = False):
    """Holds ``workdir`` for one run of ``config`` for the duration of the ``with`` block.

    A second process on the same workdir is refused (the lock dies with its holder, SIGKILL
    included). A workdir made by a different config is refused with the differing fields.
    Rerunning the same config resumes it; ``overwrite`` deletes what earlier runs wrote and
    starts over.
    """
    if "://" in workdir:
        raise ValueError(
            f"workdir {workdir!r} is a URL; the trainer writes to a local or mounted "
            "directory (mount the bucket, e.g. with gcsfuse, and pass its path)."
        )
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK_FILE), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RuntimeError(
                f"workdir {workdir} is in use by another run; wait for it to end or pass "
                "another --workdir."
            ) from None
        try:
            _check(workdir, config, overwrite)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check(workdir: str, config, overwrite: bool) -> None:
    ours = settings(config)
    path = os.path.join(workdir, RUN_FILE)
    contents = [n for n in os.listdir(workdir) if n != LOCK_FILE]
    problem = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                theirs = json.load(f)["settings"]
        except (OSError, ValueError, KeyError) as e:
            problem = f"its {RUN_FILE} is unreadable ({e})"
        else:
            diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            if diff:
                shown = "; ".join(
                    f"{k}: {theirs.get(k, '(unset)')!r} there, {ours.get(k, '(unset)')!r} now"
                    for k in diff[:8]
                )
                problem = f"it holds a run of another config ({shown})"
    elif os.path.exists(os.path.join(workdir, "config.json")):  # made before run.json existed
        try:
            with open(os.path.join(workdir, "config.json")) as f:
                theirs = settings(ml_collections.ConfigDict(json.load(f)))
        except (OSError, ValueError, TypeError) as e:
            problem = f"its config.json is unreadable ({e})"
        else:
            if theirs != ours:
                problem = "it holds a run of another config (its config.json differs)"
    elif contents:
        problem = f"it holds files of another run or program ({', '.join(sorted(contents)[:5])})"
    if problem and not overwrite:
        raise ValueError(
            f"workdir {workdir}: {problem}. Pass another --workdir, or --overwrite to delete "
            "its results and checkpoints and start over."
        )
    if overwrite:
        for name in contents:
            target = os.path.join(workdir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
    write_json(path, {"fingerprint": fingerprint(config), "settings": ours}, indent=1)
