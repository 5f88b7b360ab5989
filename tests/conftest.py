"""Test setup: 8 fake CPU devices and fast compiles, set before JAX starts."""

import os

# Must happen before jax initialises its backend: sharded kernels are tested on 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Launcher subprocesses in tests compile afresh and write nothing under ~/.cache.
os.environ.setdefault("MERGEJAX_COMPILE_CACHE", "off")
# The run's stages (training, evaluation, BatchNorm reset, statistics) use one device in the
# suite: XLA:CPU's 8 fake devices make every compile and step several times slower, and
# tests/test_data_parallel.py (which forces all 8) proves the sharded stages equal one device.
os.environ.setdefault("MERGEJAX_DATA_DEVICES", "1")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

import gc  # noqa: E402

import pytest  # noqa: E402


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after every test module.

    Each XLA:CPU executable maps ~6 memory regions for its code, and the suite compiles well
    over 10,000 programs in one process: past Linux's 65,530 maps per process
    (`vm.max_map_count`) the next compile cannot map its code and XLA segfaults (it did, in the
    last test modules). Clearing the caches between modules keeps the count near its start.
    """
    yield
    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session, exitstatus):
    """Report the process's memory maps at the end (the quantity the fixture above bounds)."""
    print(f"\nmemory maps at the end of the session: {_memory_maps()}")
