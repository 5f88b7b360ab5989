"""The persistent compilation cache: off by request, and a second process reuses executables."""

import subprocess
import sys

from mergejax.io import compile_cache

SCRIPT = """
import sys, numpy as np
from mergejax.io import compile_cache
print(compile_cache.enable(sys.argv[1]))
from mergejax.kernels import zip_match
c = np.corrcoef(np.random.default_rng(0).normal(size=(64, 16)).T).astype(np.float32)
zip_match(c, alpha=0.5, beta=1.0)
"""


def test_off_disables_it(monkeypatch):
    for value in ("off", "0", ""):
        monkeypatch.setenv(compile_cache.ENV, value)
        assert compile_cache.enable() is None


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
    assert compile_cache.default_dir() == tmp_path / "c"
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "mergejax" / "xla"


def test_a_compile_is_stored_and_found_by_the_next_process(tmp_path):
    cache = tmp_path / "xla"
    run = lambda: subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True,
                                 text=True, timeout=300)
    first = run()
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert entries  # zip_match's executable was written
    second = run()
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries  # reused, nothing new compiled
