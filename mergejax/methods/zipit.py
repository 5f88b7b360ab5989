"""ZipIt! (Stoica, Bolya et al., ICLR 2024): zip features within and across models.

Per feature space, the greedy matcher merges the most correlated pair of features of the N
models' concatenated activations (same-model pairs allowed up to a budget set by `beta`),
until n features remain; `alpha` damps the similarity of merged features. Partial zipping is
a method entry `zipit@space` (or `spaces="space"` in `mergejax.merge`): later layers stay per
model.
"""

from __future__ import annotations

from mergejax.methods.matchers import space_matcher
from mergejax.methods.registry import register


@register("zipit", "matching", needs="activations",
          checks={"alpha": "finite", "beta": "[0, inf)", "rule": ("reference", "paper")})
def zipit(spec, endpoints, statistics, *, key=None, spaces, alpha: float = 0.3,
          beta: float = 0.125, rule: str = "reference", group_heads: bool = True):
    """Per space in `spaces`, `zip_match` on the correlation of all models' features at its tap.

    Args:
      spec, endpoints: the merge spec and the N endpoints (only their number is used).
      statistics: `{space: Moments}` with `corr (N*n, N*n)` for every space in `spaces`.
      alpha, beta: ZipIt!'s similarity damping and same-model budget (ZipIt!'s `a`, `b`).
      rule: "reference" reproduces the published code bit for bit; "paper" blocks by model of
        origin and never drops a feature (see `mergejax.kernels.zip_match`).
      group_heads: zip spaces with `groups > 1` (attention heads) head by head
        (`mergejax.kernels.dual_space.group_zip_match`), so no head is split.

    Returns:
      `{space: (merge (n, N*n), unmerge (N*n, n))}`.
    """
    del key
    match = space_matcher(spec, "zip", len(endpoints), alpha=alpha, beta=beta, rule=rule,
                          group_heads=group_heads)
    return {space: match(statistics[space].corr, space) for space in spaces}
