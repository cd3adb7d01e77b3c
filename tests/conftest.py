import os

import jax
import pytest

# The real datasets, found as a user's run finds them (METAFLAX_DATA_DIR, else the checksummed
# download into the cache, which fails at once naming METAFLAX_DATA_DIR where there is no
# internet), with ../shared/data beside the checkout as the default data directory.
_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if not os.environ.get("METAFLAX_DATA_DIR") and os.path.isdir(_SHARED):
    os.environ["METAFLAX_DATA_DIR"] = os.path.normpath(_SHARED)

# Strict numerics everywhere in the suite: silent broadcasting of mismatched ranks is an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
# 8 fake CPU devices, so the sharding tests run everywhere (other tests use device 0 only).
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats (finite differences need them)."""
    with jax.enable_x64(True):
        yield
