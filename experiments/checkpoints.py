"""Orbax checkpoints of the trainer: async saves, restores validated and falling back past
damaged steps."""

from __future__ import annotations

import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def manager(directory: str, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
    )


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only, ...)."""


def _write_error(mngr, e: Exception) -> CheckpointWriteError:
    kept = [s for s in mngr.all_steps() if os.path.isdir(os.path.join(mngr.directory, str(s)))]
    return CheckpointWriteError(
        f"writing a checkpoint to {mngr.directory} failed ({type(e).__name__}: {str(e)[:500]}). "
        f"The last good checkpoint (step {max(kept) if kept else 'none'}) is kept; free disk "
        "space or pass a writable --workdir, then rerun the same command to resume."
    )


def save(mngr, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save of ``step``; a failed write (this one or the one before)
    is one :class:`CheckpointWriteError` naming the directory and the cause."""
    import orbax.checkpoint as ocp

    try:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
    except Exception as e:  # orbax and tensorstore raise ValueError / OSError / RuntimeError
        raise _write_error(mngr, e) from None


def wait(mngr) -> None:
    """Waits for the last save; a failed write is one :class:`CheckpointWriteError`."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _write_error(mngr, e) from None


class ForeignCheckpoint(ValueError):
    """A checkpoint written by a run of another config."""


def restore_latest(directory: str, abstract_state, keep: int, fingerprint: str | None = None):
    """``(mngr, state, meta)`` from the newest checkpoint that restores and is finite.

    A corrupted or half-written step is reported and moved aside to ``<directory>.corrupt/``
    (nothing is deleted), and the previous step is tried. ``state`` is None when there is none.
    A checkpoint whose metadata names another config ``fingerprint``
    (:func:`experiments.workdir.fingerprint`) is an error, not damage.
    """
    import orbax.checkpoint as ocp

    mngr = manager(directory, keep)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
            state, meta = restored["state"], restored["meta"]
            theirs = (meta or {}).get("fingerprint")
            if fingerprint and theirs and theirs != fingerprint:
                raise ForeignCheckpoint(
                    f"checkpoint step {step} in {directory} was written by another config "
                    f"(fingerprint {theirs}, this run's {fingerprint}); use another workdir."
                )
            leaves = jax.tree.leaves(state)
            if (
                meta is None
                or meta.get("step") != step
                or not all(
                    np.isfinite(np.asarray(x)).all()
                    for x in leaves
                    if jnp.issubdtype(x.dtype, jnp.floating)
                )
            ):
                raise ValueError("metadata missing or mismatched, or non-finite parameters")
            return mngr, state, meta
        except ForeignCheckpoint:
            mngr.close()
            raise
        except Exception as e:  # orbax raises assorted errors for damaged steps
            aside = os.path.join(directory + ".corrupt", f"{step}-{int(time.time())}")
            print(
                f"checkpoint step {step} in {directory} is unreadable ({type(e).__name__}: "
                f"{str(e)[:200]}); moved to {aside}, trying the previous one.",
                file=sys.stderr,
            )
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            shutil.move(os.path.join(directory, str(step)), aside)
            mngr.close()
            mngr = manager(directory, keep)
    return mngr, None, None
