"""Permute: activation matching (ZipIt!'s "Permute" baseline; Git Re-Basin's activation matching
with correlation). Every model's features are assigned one-to-one onto model 0's by an exact
linear assignment on their cross-correlation, then matched features are averaged."""

from __future__ import annotations

from mergejax.kernels.permute_match import permute_match
from mergejax.methods.registry import register


@register("permute", "matching", needs="activations")
def permute(spec, endpoints, statistics, *, key=None, spaces):
    """Per space in `spaces`, `permute_match` on the correlation of the N models' features.

    Returns `{space: (merge (n, N*n), unmerge (N*n, n))}`.
    """
    del spec, key
    return {space: permute_match(statistics[space].corr, num_models=len(endpoints))
            for space in spaces}
