"""Jitted array kernels: statistics, assignment, matching. Installed as `mergejax.kernels`.

Nothing here knows about models, files or configs: inputs are arrays (and, for weight matching,
a duck-typed spec). Nothing here imports mergejax outside `mergejax.kernels`
(tests/test_layers.py).
"""

from .assignment import (
    BACKENDS,
    assignment_score,
    available_backends,
    lapx_available,
    register_assignment_backend,
    solve_assignment,
    solve_assignment_jax,
    solve_group_assignment,
)
from .dual_space import (
    combine_similarity,
    group_permute_match,
    group_zip_match,
    matched_similarity,
    weight_similarity,
)
from .keys import seed_from_key
from .permute_match import permute_match
from .sharding import data_mesh, pad_batch, shard_batch
from .statistics import FeatureStats, Moments, covariance_to_correlation, feature_statistics
from .topk import abs_bits, keep_topk, kth_smallest_bits, topk_kth
from .transforms import merge_from_unmerge
from .weight_matching import weight_matching
from .zip_match import zip_match

__all__ = [
    "BACKENDS", "FeatureStats", "Moments", "abs_bits", "assignment_score", "available_backends",
    "combine_similarity", "covariance_to_correlation", "data_mesh", "feature_statistics",
    "group_permute_match", "group_zip_match", "keep_topk", "kth_smallest_bits",
    "lapx_available", "matched_similarity", "merge_from_unmerge", "pad_batch", "permute_match",
    "register_assignment_backend", "seed_from_key", "shard_batch", "solve_assignment",
    "solve_assignment_jax",
    "solve_group_assignment", "topk_kth", "weight_matching", "weight_similarity", "zip_match",
]
