"""Permute: activation matching (ZipIt!'s "Permute" baseline; Git Re-Basin's activation matching
with correlation). Every model's features are assigned one-to-one onto model 0's by an exact
linear assignment on their cross-correlation, then matched features are averaged."""

from __future__ import annotations

from mergejax.methods.matchers import space_matcher
from mergejax.methods.registry import register


@register("permute", "matching", needs="activations")
def permute(spec, endpoints, statistics, *, key=None, spaces, group_heads: bool = True):
    """Per space in `spaces`, `permute_match` on the correlation of the N models' features
    (`group_permute_match`, heads as units, for spaces with `groups > 1` unless `group_heads`
    is False).

    Returns `{space: (merge (n, N*n), unmerge (N*n, n))}`.
    """
    del key
    match = space_matcher(spec, "permute", len(endpoints), group_heads=group_heads)
    return {space: match(statistics[space].corr, space) for space in spaces}
