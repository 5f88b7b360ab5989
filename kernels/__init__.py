"""Jitted array kernels: statistics, assignment, matching. Installed as `mergejax.kernels`.

Nothing here knows about models, files or configs: inputs are arrays (and, for weight matching,
a duck-typed spec).
"""

from .assignment import (
    BACKENDS,
    assignment_score,
    available_backends,
    lapx_available,
    register_assignment_backend,
    solve_assignment,
    solve_assignment_jax,
)
from .dual_space import (
    combine_similarity,
    group_permute_match,
    group_zip_match,
    matched_similarity,
    weight_similarity,
)
from .permute_match import permute_match
from .sharding import data_mesh, pad_batch, shard_batch
from .statistics import FeatureStats, Moments, covariance_to_correlation, feature_statistics
from .weight_matching import weight_matching
from .zip_match import zip_match

__all__ = [
    "BACKENDS", "FeatureStats", "Moments", "assignment_score", "available_backends",
    "combine_similarity", "covariance_to_correlation", "data_mesh", "feature_statistics",
    "group_permute_match", "group_zip_match", "lapx_available", "matched_similarity",
    "pad_batch", "permute_match", "register_assignment_backend", "shard_batch",
    "solve_assignment", "solve_assignment_jax", "weight_matching", "weight_similarity",
    "zip_match",
]
