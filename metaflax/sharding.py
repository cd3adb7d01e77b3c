"""Meta-training across devices and hosts, with two named mesh axes.

- ``tasks``: data parallelism over the tasks of a meta-batch. Each device runs the inner loops
  of its own tasks; the meta-gradient is reduced across devices once, after the inner loops.
- ``model``: parameters (and optimizer state) sharded FSDP-style, for models that do not fit on
  one device: each tensor with two or more dimensions is split along its largest dimension.

Two ways to run a step, with identical results:

- ``mode="jit"``: ``jax.jit`` with named shardings (the compiler inserts the reduction);
- ``mode="shard_map"``: per-device code with ``jax.shard_map``; replicated meta-parameters are
  cast to device-varying before the inner loop (otherwise shard_map's type system would
  silently sum inner-loop gradients across devices), then the meta-gradient is ``pmean``-ed.

Multi-host (TPU VM slices, several GPU hosts): call :func:`initialize_distributed` first, then
build each process's local share of the meta-batch and assemble it with :func:`global_batch`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metaflax.algorithms import MetaAlgorithm, MetaState
from metaflax.core import Episode, PyTree, check_episodes

TASKS = "tasks"
MODEL = "model"


def make_mesh(tasks: int | None = None, model: int = 1, *, devices=None) -> Mesh:
    """A ``(tasks, model)`` device mesh; by default every device goes to the ``tasks`` axis.

    >>> mesh = make_mesh(tasks=1)
    >>> mesh.axis_names, mesh.shape[TASKS], mesh.shape[MODEL]
    (('tasks', 'model'), 1, 1)
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1:
        raise ValueError(f"model={model} must be >= 1 (the size of the '{MODEL}' axis).")
    tasks = len(devices) // model if tasks is None else tasks
    if tasks < 1 or tasks * model > len(devices):
        raise ValueError(
            f"a mesh of tasks={tasks} x model={model} needs {tasks * model} devices, but "
            f"{len(devices)} are available; shrink the mesh (or, on CPU, fake more devices with "
            "jax.config.update('jax_num_cpu_devices', n) before jax starts)."
        )
    return jax.make_mesh(
        (tasks, model),
        (TASKS, MODEL),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[: tasks * model],
    )


def _leaf_spec(path, leaf, model: int) -> P:
    shape = tuple(leaf.shape)
    if model == 1 or len(shape) < 2:
        return P()
    dim = int(np.argmax(shape))
    if shape[dim] % model:
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} has shape {shape}: its largest dimension "
            f"({shape[dim]}) is not divisible by the {model} devices of the 'model' axis; choose "
            "a model axis size that divides it (or 1 to replicate the parameters)."
        )
    return P(*([None] * dim + [MODEL]))


def state_shardings(abstract_state: PyTree, mesh: Mesh) -> PyTree:
    """NamedShardings for a meta-state (or any pytree of arrays / ``ShapeDtypeStruct``).

    Replicated when the ``model`` axis has size 1; otherwise every leaf with >= 2 dimensions is
    split along its largest dimension over ``model`` (optimizer moments follow their params).
    """
    model = mesh.shape[MODEL]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _leaf_spec(path, leaf, model)), abstract_state
    )


def episode_sharding(episodes: Episode, mesh: Mesh) -> PyTree:
    """Shards every leaf of a meta-batch along its leading ``[tasks]`` axis."""
    num_tasks = check_episodes(episodes)
    devices = mesh.shape[TASKS]
    if num_tasks % devices:
        raise ValueError(
            f"meta_batch_size={num_tasks} must be divisible by the {devices} devices on the "
            f"'{TASKS}' axis; use a multiple of {devices} tasks per meta-batch."
        )
    return jax.tree.map(lambda _: NamedSharding(mesh, P(TASKS)), episodes)


class ShardedMetaLearner(NamedTuple):
    """A meta-algorithm placed on a mesh.

    Attributes:
      init: ``init(params) -> MetaState`` placed with ``state_sharding`` (jitted, so the state
        is created directly sharded; ``params`` may come from a jitted initialiser).
      step: ``step(state, episodes, key) -> (state, metrics)``; jitted, the state donated.
      state_sharding: the ``MetaState`` of NamedShardings.
      shard_episodes: puts a host (or single-device) meta-batch onto the mesh.
    """

    init: Callable[[PyTree], MetaState]
    step: Callable[[MetaState, Episode, jax.Array], tuple[MetaState, dict]]
    state_sharding: MetaState
    shard_episodes: Callable[[Episode], Episode]


def shard(alg: MetaAlgorithm, mesh: Mesh, params: PyTree, *, mode: str = "jit"):
    """Places ``alg`` on ``mesh``: sharded ``init`` and ``step`` (``mode`` "jit" or "shard_map").

    ``params`` may be abstract (``jax.ShapeDtypeStruct`` leaves): only shapes are used here.
    Per-task PRNG keys are split from the step key exactly as on one device, then sharded like
    the episodes, so every mode gives the single-device result.

    >>> import jax, jax.numpy as jnp, optax
    >>> import metaflax as mf
    >>> loss_fn = lambda p, b, k: (jnp.mean((p - b) ** 2), {})
    >>> alg = mf.maml(loss_fn, inner_tx=optax.sgd(0.1), outer_tx=optax.sgd(0.1), num_inner_steps=1)
    >>> learner = shard(alg, make_mesh(tasks=1), jnp.zeros(3))
    >>> state = learner.init(jnp.zeros(3))
    >>> episodes = learner.shard_episodes(mf.Episode(jnp.ones((4, 3)), jnp.ones((4, 3))))
    >>> state, metrics = learner.step(state, episodes, jax.random.key(0))
    >>> int(state.step)
    1
    """
    if mode not in ("jit", "shard_map"):
        raise ValueError(f"mode={mode!r} is not valid: use 'jit' or 'shard_map'.")
    if mode == "shard_map" and mesh.shape[MODEL] != 1:
        raise ValueError(
            "mode='shard_map' replicates the meta-parameters on every device; for a mesh with a "
            f"'{MODEL}' axis of size {mesh.shape[MODEL]} use mode='jit'."
        )
    abstract_state = jax.eval_shape(alg.init, params)
    state_sh = state_shardings(abstract_state, mesh)
    replicated = NamedSharding(mesh, P())
    keys_sh = NamedSharding(mesh, P(TASKS))

    def shard_episodes(episodes: Episode) -> Episode:
        return jax.device_put(episodes, episode_sharding(episodes, mesh))

    def per_task_keys(key, episodes):
        keys = jax.random.split(key, check_episodes(episodes))
        if mesh.axis_types[mesh.axis_names.index(TASKS)] == AxisType.Explicit:
            return jax.sharding.reshard(keys, keys_sh)
        return jax.lax.with_sharding_constraint(keys, keys_sh)

    if mode == "jit":

        def step(state, episodes, key):
            return alg.step(state, episodes, per_task_keys(key, episodes))

    else:

        def per_device(state, episodes, keys):
            # Without the cast, the inner-loop gradient w.r.t. replicated (device-invariant)
            # params would be summed across devices by shard_map: wrong MAML numbers, no error.
            meta_params = jax.tree.map(
                lambda p: jax.lax.pcast(p, TASKS, to="varying"), state.meta_params
            )
            grads, metrics = alg.meta_grad(meta_params, episodes, keys, step=state.step)
            grads, metrics = jax.lax.pmean((grads, metrics), TASKS)
            return alg.outer_update(state, grads, metrics)

        def step(state, episodes, key):
            sharded = jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(P(), P(TASKS), P(TASKS)),
                out_specs=(P(), P()),
            )
            return sharded(state, episodes, per_task_keys(key, episodes))

    def checked_step(state, episodes, key):
        episode_sharding(episodes, mesh)  # divisibility error before tracing
        return jitted_step(state, episodes, key)

    jitted_step = jax.jit(
        step,
        in_shardings=(state_sh, None, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    init = jax.jit(alg.init, out_shardings=state_sh)
    return ShardedMetaLearner(init, checked_step, state_sh, shard_episodes)


# ----------------------------------------------------------------------------------------------
# Multi-host.


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts ``jax.distributed`` when asked, by argument or by ``METAFLAX_DISTRIBUTED=1``.

    On TPU VMs and SLURM/GPU clusters JAX discovers the coordinator itself; elsewhere pass the
    arguments (or ``METAFLAX_COORDINATOR``, ``METAFLAX_NUM_PROCESSES``, ``METAFLAX_PROCESS_ID``).
    Returns whether it initialised. Call it before any other JAX call.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("METAFLAX_COORDINATOR")
    if num_processes is None and "METAFLAX_NUM_PROCESSES" in env:
        num_processes = int(env["METAFLAX_NUM_PROCESSES"])
    if process_id is None and "METAFLAX_PROCESS_ID" in env:
        process_id = int(env["METAFLAX_PROCESS_ID"])
    asked = env.get("METAFLAX_DISTRIBUTED") == "1" or coordinator_address is not None
    if not asked:
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def is_main_process() -> bool:
    """True on the process that writes logs, checkpoints and results (process 0)."""
    return jax.process_index() == 0


def local_task_slice(num_tasks: int) -> slice:
    """The tasks of a global meta-batch that this process builds (contiguous, equal shares)."""
    n = jax.process_count()
    if num_tasks % n:
        raise ValueError(
            f"meta_batch_size={num_tasks} must be divisible by the {n} processes; each builds "
            "an equal share of the tasks."
        )
    share = num_tasks // n
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def global_batch(local_episodes: Episode, mesh: Mesh) -> Episode:
    """Assembles each process's local share of a meta-batch into one global sharded batch.

    Every process passes its own tasks (``local_task_slice``); no process ever holds the whole
    meta-batch.
    """

    def assemble(x: Any):
        x = np.asarray(x)
        sharding = NamedSharding(mesh, P(TASKS))
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(assemble, local_episodes)


__all__ = [
    "MODEL",
    "TASKS",
    "ShardedMetaLearner",
    "episode_sharding",
    "global_batch",
    "initialize_distributed",
    "is_main_process",
    "local_task_slice",
    "make_mesh",
    "shard",
    "state_shardings",
]
