import os
import shutil
import tempfile

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

# One compilation cache for this run, shared by the xdist workers (many tests compile the same
# small programs); removed when the run ends, so every run starts cold as CI's does.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
_CACHE = os.path.join(tempfile.gettempdir(), f"metaflax-test-jax-cache-{_RUN}")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def x64():
    """Runs a test with 64-bit floats (finite differences need them)."""
    with jax.enable_x64(True):
        yield
