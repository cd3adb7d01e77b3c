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


def save(mngr, step: int, state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )


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
