"""FS-Merge (Kinderman, Hubara, Maron, Soudry; "Foldable SuperNets", TMLR 2025).

Learned per-layer merge and unmerge matrices around the frozen endpoints, fitted with AdamW to
reconstruct each task's endpoint features from that task's images, then folded in closed form
into one model of the merged width. The machinery lives in `mergejax.fsmerge`; this module
registers it and computes the ZipIt! initialisation (`init="zipit"`, beyond the published code).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mergejax import fsmerge
from mergejax.fsmerge.features import tap_moments
from mergejax.fsmerge.fit import SCHEDULES
from mergejax.fsmerge.widths import resize
from mergejax.kernels.zip_match import zip_match
from mergejax.methods.learned import LearnedMerge
from mergejax.methods.registry import register
from mergejax.methods.zipit import zipit
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec, for_model


def zipit_transforms(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                     images: np.ndarray, width: float = 1.0, *, alpha: float = 0.3,
                     beta: float = 0.125) -> dict[str, tuple]:
    """ZipIt!'s `{space: (merge (d', N*d), unmerge (N*d, d'))}` on `images` (every task's).

    At the endpoints' width this is the registered `zipit` matching on the same statistics
    (so the init folds to ZipIt!'s merge). At another width d' each space is zipped to d'
    features (`reduction = 1 - d'/(N*d)`: a partial or a further merge), which needs
    d' <= N*d and a space without head groups.
    """
    stats = tap_moments(model, spec, endpoints, images)
    missing = [s for s in spec.space_names if s not in stats]
    if missing:
        raise ValueError(f"init='zipit' needs a tap on every space; none on {missing}")
    n = len(endpoints)
    if width == 1:
        return zipit(spec, list(endpoints), stats, spaces=spec.space_names, alpha=alpha,
                     beta=beta)
    merged = for_model(resize(model, width))
    out = {}
    for s in spec.spaces:
        d_new = merged.space(s.name).width
        if s.groups > 1 or d_new > n * s.width:
            raise ValueError(f"init='zipit' at width {width}: space {s.name!r} ({s.width} -> "
                             f"{d_new}, {s.groups} head groups) cannot be zipped; use the "
                             "endpoints' width or init='first'/'average'")
        out[s.name] = zip_match(stats[s.name].corr, alpha=alpha, beta=beta,
                                reduction=1 - d_new / (n * s.width), num_models=n)
    return out


@register("fs_merge", "learned",
          checks={"width": "(0, inf)", "init": fsmerge.INITS,
                  "param": fsmerge.PARAMETERISATIONS, "rank": "int [1, inf)",
                  "objective": fsmerge.OBJECTIVES, "steps": "int [1, inf)",
                  "batch_size": "int [1, inf)", "lr": "(0, inf)", "weight_decay": "[0, inf)",
                  "schedule": tuple(SCHEDULES.names()), "augment": "int [0, inf)"})
def fs_merge(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
             task_images: Sequence[np.ndarray], *, key: jax.Array, width: float = 1.0,
             init: str = "first", param: str = "diagonal_and_low_rank", rank: int = 12,
             objective: str = "global", steps: int = 1000, batch_size: int = 128,
             lr: float = 1e-4, weight_decay: float = 1e-3, schedule: str = "onecycle",
             augment: int = 8) -> LearnedMerge:
    """FS-Merge: fit per-layer merge/unmerge matrices on a few images per task, then fold.

    Args:
      model, spec, endpoints, task_images, key: the learned-family arguments
        (`mergejax.methods.learned`).
      width: merged width as a factor of the endpoints' (every space; `fsmerge.resize`).
      init: "first" (folds to endpoint 0), "average" (folds to the weight average) or "zipit"
        (folds to ZipIt!'s merge on the task images).
      param: parameterisation of each M and U ("diagonal", "low_rank",
        "diagonal_and_low_rank" (the paper's default), "full"); `rank` for the low-rank part.
      objective: "global" (head-input features) or "local" (every tapped layer too).
      steps, batch_size, lr, weight_decay, schedule: AdamW on a one-cycle schedule; lr is the
        paper's 1e-4 for its default (low-rank) parameterisations (it uses 1e-3 for "diagonal").
      augment: shifted copies per original image added to the fitting set.

    Returns:
      `LearnedMerge(model at the merged width, per-endpoint trees, {"loss": [...]})`. For
      BatchNorm models the fit normalises with batch statistics: recompute the running ones.
    """
    transforms = None
    if init == "zipit":
        transforms = zipit_transforms(model, spec, endpoints, np.concatenate(task_images),
                                      width)
    s = fsmerge.setup(model, spec, endpoints, task_images, key=key, width=width, init=init,
                      param=param, rank=rank, objective=objective, steps=steps,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, augment=augment, init_transforms=transforms)
    mu, history = fsmerge.fit_setup(s)
    return LearnedMerge(s.model, fsmerge.fold_setup(s, mu), history)
