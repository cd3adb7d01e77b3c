"""One process of the two-process test (tests/test_sharding.py); not a test module itself.

usage: python tests/distributed_worker.py PROCESS_ID PORT ALGORITHM OUT.npz
"""

import sys

import jax
import numpy as np
from helpers import make_algorithm, sinusoid_setup

from metaflax import sharding


def main():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)  # 2 processes x 2 devices = a 4-device mesh
    process_id, port, algorithm, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    loss_fn, params, episodes = sinusoid_setup(tasks=8)
    alg = make_algorithm(algorithm, loss_fn)
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 4 and jax.process_count() == 2
    local = jax.tree.map(lambda x: np.asarray(x)[sharding.local_task_slice(8)], episodes)
    learner = sharding.shard(alg, mesh, params)
    state = learner.init(params)
    for i in range(3):
        state, metrics = learner.step(state, sharding.global_batch(local, mesh), jax.random.key(i))
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.meta_params)]
    if sharding.is_main_process():
        arrays = {f"arr_{i}": leaf for i, leaf in enumerate(leaves)}
        np.savez(out, loss=np.asarray(metrics["loss"].addressable_data(0)), **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
