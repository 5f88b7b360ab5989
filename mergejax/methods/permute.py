"""Permute: activation matching (ZipIt!'s "Permute" baseline; Git Re-Basin's activation matching
with correlation). Every model's features are assigned one-to-one onto model 0's by an exact
linear assignment on their cross-correlation, then matched features are averaged."""

from __future__ import annotations

from mergejax.kernels.permute_match import permute_match
from mergejax.methods.registry import register


@register("permute", "matching")
def permute(problem):
    """Per space, `permute_match` on the correlation of all models' features at its tap."""
    stats = problem.statistics()
    return {space: permute_match(stats[space].corr, num_models=problem.num_models)
            for space in problem.spaces}
