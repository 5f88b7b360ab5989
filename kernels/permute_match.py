"""ZipIt!'s "Permute" matcher: align every model onto model 0 by exact linear assignment.

Re-expression of `match_tensors_permute` (ZipIt!, `matching_functions.py`): given the joint
correlation of N models' n features each, model i >= 1 is permuted onto model 0 by maximising
`sum_r corr[r, n*i + col[r]]`; the merged feature r averages feature r of model 0 with feature
col_i[r] of every model i. Output has the (merge, unmerge) interface of the other matchers:

- unmerge U (N*n, n): 0/1, block i (rows i*n:(i+1)*n) is U_i with U_0 = I and
  U_i[col_i[r], r] = 1 (the reference's ``eye(n)[col_i].T``): merged feature r comes from
  feature col_i[r] of model i.
- merge M (n, N*n) = (U / (colsum(U) + 1e-5)).T: every column of U sums to N, so each nonzero
  entry is 1/(N + 1e-5), computed in the input dtype exactly as the reference does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .assignment import solve_assignment
from .checks import check_dtype, check_finite_array
from .transforms import merge_from_unmerge

__all__ = ["permute_match"]


def permute_match(corr, *, num_models: int = 2, backend: str = "scipy"):
    """Permutation matching of `num_models` models onto the first (ZipIt!'s Permute baseline).

    Args:
      corr: (N*n, N*n) correlation of the concatenated features of N = `num_models` models
        (model i owns rows/cols i*n:(i+1)*n). Only the blocks corr[:n, i*n:(i+1)*n], i >= 1,
        are read. Floating or integer dtype, all values finite (ValueError naming the count and
        the first position otherwise). numpy or jax (also traced, see `solve_assignment`; a
        traced corr's values are checked by the assignment backend).
      num_models: N >= 1.
      backend: assignment backend (`mergejax.kernels.assignment.available_backends()`).
        Default ``"scipy"`` because it reproduces the reference's choice among *tied* optima
        (scipy is what ZipIt! calls); every backend gives the same optimal total, so with
        untied real-valued correlations ``"auto"`` gives identical matrices, faster for big n.

    Returns:
      merge: (n, N*n), unmerge: (N*n, n), both in corr's floating dtype (float32 for integer
        input); numpy for numpy input, jax for jax input.
    """
    fn = "permute_match"
    if (isinstance(num_models, bool) or not isinstance(num_models, int | np.integer)
            or num_models < 1):
        raise ValueError(f"{fn}: num_models must be a positive int, got {num_models!r}")
    shape = tuple(np.shape(corr))
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] % num_models or not shape[0]:
        raise ValueError(
            f"{fn}: corr must be square (N*n, N*n) with N = num_models = {num_models}; got "
            f"{shape} (need n >= 1 features per model)"
        )
    check_dtype(fn, "corr", corr, integer_ok=True)
    check_finite_array(fn, "corr", corr)
    xp = jnp if isinstance(corr, jax.Array) else np
    corr = xp.asarray(corr)
    dtype = corr.dtype if xp.issubdtype(corr.dtype, xp.floating) else xp.float32
    n = shape[0] // num_models

    eye = xp.eye(n, dtype=dtype)
    blocks = [eye]
    for i in range(1, num_models):
        col = solve_assignment(corr[:n, i * n : (i + 1) * n], maximize=True, backend=backend)
        # eye[col].T places a 1 at (col[r], r): model i's feature col[r] feeds merged feature r.
        blocks.append(eye[col].T)
    unmerge = xp.concatenate(blocks, axis=0)
    return merge_from_unmerge(unmerge), unmerge
