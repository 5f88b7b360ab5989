"""Test setup: 8 fake CPU devices and fast compiles, set before JAX starts."""

import os

# Must happen before jax initialises its backend: sharded kernels are tested on 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Launcher subprocesses in tests compile afresh and write nothing under ~/.cache.
os.environ.setdefault("MERGEJAX_COMPILE_CACHE", "off")

import jax  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
