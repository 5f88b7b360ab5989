"""Shared test fixtures: tiny models with random BatchNorm statistics; several processes of
one jax.distributed job."""

import os
import socket
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mergejax import models


def random_batch_stats(variables, seed=0):
    """Variables with BatchNorm mean ~ U(-0.5, 0.5) and var ~ U(0.5, 2) (as in the golden)."""
    if "batch_stats" not in variables:
        return variables
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    flat = {k: (rng.uniform(-0.5, 0.5, a.shape) if k.endswith("mean")
                else rng.uniform(0.5, 2.0, a.shape)).astype(np.float32) for k, a in flat.items()}
    return {**variables, "batch_stats": traverse_util.unflatten_dict(flat, sep="/")}


TINY = {
    "mlp": (dict(num_classes=5, hidden=(16, 12)), (4, 8, 8, 1)),
    "resnet20": (dict(width=1, num_classes=5), (4, 8, 8, 1)),
    "vgg11": (dict(width=1, num_classes=5), (2, 32, 32, 3)),
    "resnet50": (dict(width=0.125, num_classes=5, stage_sizes=(2, 1, 1, 1)), (2, 32, 32, 3)),
}


def tiny(name, seed=0):
    """(model, variables with random BN stats, input batch) for a tiny `name` model."""
    kwargs, shape = TINY[name]
    model = models.create(name, **kwargs)
    x = jax.random.normal(jax.random.key(seed + 100), shape)
    variables = model.init(jax.random.key(seed), jnp.zeros(shape))
    return model, random_batch_stats(jax.tree.map(np.asarray, variables), seed), np.asarray(x)


class Problem:
    """Test helper: N endpoints, the spaces to merge and a batch source; `run(method, **hp)`
    calls the pure matching method the way `mergejax.merging.match` does (statistics collected
    once, only if the method reads activations)."""

    def __init__(self, model, spec, endpoints, spaces, batches, key=None):
        from mergejax.statistics import StatisticsCache

        self.model, self.spec, self.endpoints = model, spec, list(endpoints)
        self.spaces, self.key = list(spaces), key if key is not None else jax.random.key(0)
        self.cache = StatisticsCache(model, spec, self.endpoints, batches)

    def statistics(self):
        return self.cache.get(self.spaces)

    def run(self, name, **hparams):
        from mergejax import merging

        return merging.match(name, self.spec, self.endpoints, self.cache, spaces=self.spaces,
                             key=self.key, hparams=hparams)


def model_b_permutations(spec, transforms):
    """`{space: perm}` read off a full two-model alignment: B's block of each unmerge must be a
    permutation (asserted), and merged feature j is B's feature perm[j]."""
    perms = {}
    for space in spec.spaces:
        n = space.width
        unmerge_b = np.asarray(transforms[space.name][1])[n:]  # (B's features, merged features)
        assert unmerge_b.shape == (n, n) and ((unmerge_b != 0).sum(axis=0) == 1).all()
        perms[space.name] = np.argmax(unmerge_b != 0, axis=0)
        assert sorted(perms[space.name]) == list(range(n)), space.name
    return perms


def random_trees(shapes, n, seed=0):
    """A base tree of standard normal leaves with `shapes` ({name: shape}) and `n` fine-tuned
    trees, each the base plus standard normal noise (float32)."""
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    fts = [jax.tree.map(lambda x: (x + rng.standard_normal(x.shape)).astype(np.float32), base)
           for _ in range(n)]
    return base, fts


def flat(tree):
    """Every leaf of `tree` raveled and concatenated, in tree order."""
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


def snapshot(path):
    """`{relpath: (size, mtime_ns)}` of every file under `path` (hidden ones included; {} if
    `path` does not exist): compare before/after to prove nothing was written or deleted."""
    import os
    from pathlib import Path

    root = Path(path)
    if root.is_file():
        st = root.stat()
        return {".": (st.st_size, st.st_mtime_ns)}
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            p = Path(folder) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def json_numbers(value):
    """Every number in nested JSON data (dicts and lists), booleans left out."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in json_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in json_numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def free_port() -> int:
    """A free TCP port on localhost (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def distributed_env(**extra: str) -> dict:
    """The environment of one process of a local jax.distributed job: CPU, one device per
    process (the processes are the "hosts"), no compilation cache, and without the suite's
    MERGEJAX_DATA_DEVICES (refused on several processes)."""
    env = {k: v for k, v in os.environ.items() if k != "MERGEJAX_DATA_DEVICES"}
    return {**env, "JAX_PLATFORMS": "cpu", "MERGEJAX_COMPILE_CACHE": "off",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **extra}


def run_together(jobs, *, cwd=None, timeout: float = 600) -> list:
    """Starts every (command, environment) of `jobs` at once and waits for all; returns their
    `subprocess.CompletedProcess` (text stdout/stderr), in order."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd, env in jobs]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done
