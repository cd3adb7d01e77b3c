"""The hand-written reference steps of benchmarks/reference.py compute what metaflax computes."""

import jax
import pytest
from helpers import tree_allclose

from benchmarks import reference, workloads


@pytest.mark.parametrize("kind", reference.KINDS)
def test_reference_step_equals_metaflax(kind):
    w = workloads.sinusoid()
    alg = workloads.make_algorithm(kind, w, num_inner_steps=2)
    state, metrics = jax.jit(alg.step)(alg.init(w.params), w.episodes, jax.random.key(0))
    step, outer = reference.reference_step(kind, w, num_inner_steps=2)
    params, _, loss = jax.jit(step)(w.params, outer.init(w.params), w.episodes, jax.random.key(0))
    assert tree_allclose(params, state.meta_params, rtol=1e-6, atol=1e-7)
    assert abs(float(loss) - float(metrics["loss"])) < 1e-6
