"""MuDSC (Xu et al., CVPR 2024, "Training-Free Pretrained Model Merging"): dual-space matching.

Features are matched on `fix_rate * S_weight + (1 - fix_rate) * S_act` (see
`mergejax.kernels.dual_space`). S_weight of a space depends on the current matrices of its
neighbours, so matching runs as Git Re-Basin-style coordinate sweeps: each sweep visits the
merged spaces in a seeded random order and re-matches each on its freshly recomputed S. A sweep's
score is the mean over spaces of the mean matched similarity; the best sweep is kept, a sweep
that does not beat it is undone, and the loop stops after `tol` such sweeps (or `iters`).

- The starting matrices are the activation-only matcher's (MuDSC's `act_transform`); with
  fix_rate = 0 every sweep sees S = S_act, so the result is exactly `zipit` / `permute`.
- fix_rate = 1 is pure weight matching (MuDSC's W. Zip / W. Align; with `matcher="permute"`
  Git Re-Basin on Pearson similarities): no statistics are collected (data-free), and the
  sweeps start from each model's own basis, Git Re-Basin's identity start.
- Spaces with `groups > 1` (attention heads, GroupNorm groups) use the group matchers.
"""

from __future__ import annotations

import numpy as np

from mergejax.kernels.dual_space import (
    combine_similarity,
    matched_similarity,
    stack_models,
    weight_similarity,
)
from mergejax.kernels.keys import seed_from_key
from mergejax.methods.matchers import MATCHERS, space_matcher
from mergejax.methods.registry import register
from mergejax.specs import flatten


def _needs(hparams) -> str:
    """MuDSC reads activations unless fix_rate is 1, and weights unless it is 0."""
    fix_rate = hparams.get("fix_rate", 0.5)
    return "weights" if fix_rate >= 1.0 else "activations" if fix_rate <= 0.0 else "both"


@register("mudsc", "matching", needs=_needs,
          search=dict(fix_rate=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
          checks={"fix_rate": "[0, 1]", "matcher": MATCHERS, "alpha": "finite",
                  "beta": "[0, inf)", "iters": "int [1, inf)", "tol": "int [1, inf)",
                  "use_cos": (False, True), "rule": ("reference", "paper")})
def mudsc(spec, endpoints, statistics, *, key=None, spaces, fix_rate: float = 0.5,
          matcher: str = "zip", alpha: float = 0.5, beta: float = 1.0, iters: int = 100,
          tol: int = 5, use_cos: bool = False, rule: str = "reference",
          group_heads: bool = True):
    """Per space, ZipIt or permutation matching on the weight/activation similarity mix.

    Args:
      spec, endpoints: the merge spec and the N endpoints (their `params` are read).
      statistics: `{space: Moments}` for the spaces of `spaces` with a tap (unused, and may be
        empty, at fix_rate 1).
      key: seeds the order in which each sweep visits the spaces.
      spaces: the spaces to merge.
      fix_rate: weight share of the similarity in [0, 1] (the paper's balance factor alpha).
      matcher: "zip" (ZipIt greedy, MuDSC's default fusion) or "permute" (LAP onto model 0).
      alpha, beta, rule: the zip matcher's hyperparameters (MuDSC's script uses a=0.5, b=1).
      iters: the most sweeps; tol: stop after this many sweeps without a better score.
      use_cos: cosine instead of Pearson similarity of the weight vectors.
      group_heads: match spaces with `groups > 1` (attention heads) group by group; False is
        MuDSC's ablation without group matching.

    Returns:
      `{space: (merge (n, N*n), unmerge (N*n, n))}` for every space in `spaces`.
    """
    if matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
    if not 0.0 <= fix_rate <= 1.0:
        raise ValueError(f"fix_rate must be in [0, 1], got {fix_rate}")
    if iters < 1 or tol < 1:
        raise ValueError(f"iters and tol must be >= 1, got {iters} and {tol}")
    spaces, num_models = list(spaces), len(endpoints)
    match = space_matcher(spec, matcher, num_models, alpha=alpha, beta=beta, rule=rule,
                          group_heads=group_heads)
    # fix_rate = 1 never reads activations: don't run the models over the data at all. The
    # similarities live on the host (numpy), where the matchers' assignments run anyway.
    s_act = ({k: np.asarray(m.corr, np.float32) for k, m in statistics.items()
              if k in spaces} if fix_rate < 1.0 else {})
    mats = {s: match(s_act[s], s) for s in spaces if s in s_act}
    # BatchNorm running statistics are not weights (MuDSC `ignore`s them): params only.
    stacked = stack_models([{k: v for k, v in flatten(e).items() if k.startswith("params/")}
                            for e in endpoints]) if fix_rate > 0.0 else {}

    rng = np.random.default_rng(seed_from_key(key))
    best, best_score, stale = None, -np.inf, 0
    # fix_rate = 0: S = S_act never changes, so the first sweep is already the fixed point
    for _ in range(1 if fix_rate == 0.0 else iters):
        scores = []
        for idx in rng.permutation(len(spaces)):
            space = spaces[idx]
            s_w = (weight_similarity(spec, stacked, space, mats, use_cos=use_cos)
                   if fix_rate > 0.0 else None)
            if s_w is None and space not in s_act:
                raise ValueError(f"space {space!r} has neither weights nor an activation tap")
            sim = combine_similarity(s_w, s_act.get(space), fix_rate)
            mats[space] = match(sim, space)
            scores.append(matched_similarity(sim, mats[space][1]))
        score = float(np.mean(scores))
        if best is not None and score <= best_score:
            stale += 1
            if stale >= tol:
                break
            mats = dict(best)  # MuDSC restarts the next sweep from the best matrices
        else:
            best, best_score, stale = dict(mats), score, 0
    return best
