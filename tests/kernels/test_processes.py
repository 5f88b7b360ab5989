"""Host collectives between processes: identities in one process, and the int64 arithmetic of
`process_sum` with a simulated second process (the real two-process path runs in
tests/test_recipe_hf.py and tests/test_distributed.py)."""

import numpy as np
import pytest

from mergejax.kernels import processes


def test_single_process_identities():
    c = np.array([[0, 5], [2**40, 7]], np.int64)
    np.testing.assert_array_equal(processes.process_sum(c), c)
    assert processes.process_sum(c).dtype == np.int64
    assert processes.all_processes(True).tolist() == [True]
    assert processes.all_processes(False).tolist() == [False]
    assert processes.from_process_0(123) == 123
    with pytest.raises(ValueError, match="non-negative"):
        processes.process_sum(np.array([1, -1]))


def test_process_sum_is_exact_beyond_int32_over_simulated_processes(monkeypatch):
    """Three 'processes' holding different counts up to 2^61: the two int31 halves carry."""
    rng = np.random.default_rng(0)
    per_process = [rng.integers(0, 2**61, size=(4, 3), dtype=np.int64) for _ in range(3)]
    per_process[0][0, 0] = 2**31 - 1  # a low half at its maximum
    per_process[1][0, 0] = 2**31 + 1
    calls = []

    def gather(x):  # what process_allgather returns: each process's array, stacked
        calls.append(x.dtype)
        i = len(calls) - 1
        assert x.dtype == np.int32
        mine = x
        others = [np.stack([(c >> 31).astype(np.int32), (c & (2**31 - 1)).astype(np.int32)])
                  for c in per_process[1:]]
        return np.stack([mine] + others) if i == 0 else None

    monkeypatch.setattr(processes.jax, "process_count", lambda: 3)
    monkeypatch.setattr(processes, "_gather", gather)
    got = processes.process_sum(per_process[0])
    want = sum(int(c[0, 0]) for c in per_process)
    assert int(got[0, 0]) == want  # > 2^31, exact
    np.testing.assert_array_equal(got, per_process[0] + per_process[1] + per_process[2])
