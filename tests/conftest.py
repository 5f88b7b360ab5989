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
