import jax
import pytest

# Strict numerics everywhere in the suite: silent broadcasting of mismatched ranks is an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
# 8 fake CPU devices, so the sharding tests run everywhere (other tests use device 0 only).
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats (finite differences need them)."""
    with jax.enable_x64(True):
        yield
