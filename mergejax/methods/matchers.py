"""Matching one feature space from its similarity: the zip or permute matcher, grouped or not.

Shared by `zipit`, `permute` and `mudsc`. A space with `groups > 1` (attention heads, GroupNorm
groups) is matched with the group matchers of `mergejax.kernels.dual_space` when `group_heads`
is True: groups are paired first and features matched only inside paired groups, so a head
moves as a unit and the merged model still computes attention head by head. Ungrouped matching
of such a space may split a head (MuDSC's "without group matching" ablation).
"""

from __future__ import annotations

from collections.abc import Callable

from mergejax.kernels.dual_space import group_permute_match, group_zip_match
from mergejax.kernels.permute_match import permute_match
from mergejax.kernels.zip_match import zip_match

MATCHERS = ("zip", "permute")


def space_matcher(spec, matcher: str, num_models: int, *, alpha: float = 0.5,
                  beta: float = 1.0, rule: str = "reference", group_heads: bool = True
                  ) -> Callable:
    """`match(similarity (N*n, N*n), space) -> (merge (n, N*n), unmerge (N*n, n))`.

    `matcher` is "zip" (ZipIt!'s greedy zip with `alpha`, `beta`, `rule`) or "permute" (exact
    assignment onto model 0); grouped spaces use the group matchers unless `group_heads` is
    False.
    """
    if matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")

    def match(corr, space: str):
        groups = spec.space(space).groups if group_heads else 1
        if matcher == "zip":
            if groups > 1:
                return group_zip_match(corr, groups=groups, alpha=alpha, beta=beta,
                                       num_models=num_models, rule=rule)
            return zip_match(corr, alpha=alpha, beta=beta, num_models=num_models, rule=rule)
        if groups > 1:
            return group_permute_match(corr, groups=groups, num_models=num_models)
        return permute_match(corr, num_models=num_models)

    return match
