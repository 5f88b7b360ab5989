"""Jitted array kernels: statistics, assignment, matching. Installed as `mergejax.kernels`."""
