"""The (merge, unmerge) matrix pair of a feature space: merge built from unmerge.

Every matcher (`zip_match`, `permute_match`, `group_permute_match`, `group_zip_match`) decides
an unmerge matrix U (which original features feed which merged feature) and derives the merge
matrix from it with ZipIt!'s formula, here in one place.
"""

from __future__ import annotations

from .checks import check_dtype, check_finite_array

__all__ = ["ZIPIT_EPS", "merge_from_unmerge"]

ZIPIT_EPS = 1e-5  # ZipIt!'s `match_tensors_*`: merge = (U / (colsum(U) + 1e-5)).T


def merge_from_unmerge(unmerge):
    """ZipIt!'s merge matrix M = (U / (colsum(U) + 1e-5)).T from an unmerge matrix U.

    Args:
      unmerge: U, (N*n, n_out) 0/1 floating matrix (numpy or jax, also traced; concrete ones
        must be finite): U[k, c] = 1 iff
        original feature k (model k // n) is in merged feature c. A zero row drops a feature.

    Returns:
      merge: M, (n_out, N*n) in U's dtype and array type: merged feature c is the mean of its
        cluster's features, each weighted 1 / (|cluster c| + 1e-5). The float operations (sum,
        add 1e-5, divide) are ZipIt!'s, in that order, so M matches the reference bit for bit.
    """
    if len(getattr(unmerge, "shape", ())) != 2:
        raise ValueError(f"merge_from_unmerge: unmerge must be a 2-D (N*n, n_out) matrix, got "
                         f"shape {getattr(unmerge, 'shape', None)}")
    check_dtype("merge_from_unmerge", "unmerge", unmerge)
    check_finite_array("merge_from_unmerge", "unmerge", unmerge)
    return (unmerge / (unmerge.sum(axis=0, keepdims=True) + ZIPIT_EPS)).T
