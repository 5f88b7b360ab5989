"""ZipIt! (Stoica, Bolya et al., ICLR 2024): zip features within and across models.

Per feature space, the greedy matcher merges the most correlated pair of features of the N
models' concatenated activations (same-model pairs allowed up to a budget set by `beta`),
until n features remain; `alpha` damps the similarity of merged features. Partial zipping is
a method entry `zipit@space` (handled by the run): layers past `space` stay per model.
"""

from __future__ import annotations

from mergejax.kernels.zip_match import zip_match
from mergejax.methods.registry import register


@register("zipit", "matching", hparams=dict(alpha=0.3, beta=0.125, rule="reference"))
def zipit(problem, *, alpha: float = 0.3, beta: float = 0.125, rule: str = "reference"):
    """Per space, `zip_match` on the correlation of all models' features at its tap.

    `rule="reference"` reproduces the published code bit for bit; `"paper"` blocks by model of
    origin and never drops a feature (see `mergejax.kernels.zip_match`).
    """
    stats = problem.statistics()
    return {space: zip_match(stats[space].corr, alpha=alpha, beta=beta,
                             num_models=problem.num_models, rule=rule)
            for space in problem.spaces}
