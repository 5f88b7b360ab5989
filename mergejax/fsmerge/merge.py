"""FS-Merge end to end: set up the SuperNet, fit it, fold it into per-task variables.

`setup` builds everything a fit needs (the merged model at its width, the plan, the initial
matrices, the learned state, the fitting set); `fit_setup` runs the optimiser; `fold_setup`
gives the merged model's variables, one tree per endpoint (the shared folded trunk with that
endpoint's head after its U: the "multi-head" evaluation of the paper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mergejax.fsmerge.data import fitting_data
from mergejax.fsmerge.fit import FitSettings, fit_loop
from mergejax.fsmerge.fold import folded, frozen_state, init_mu, stack
from mergejax.fsmerge.objective import OBJECTIVES, FSProblem
from mergejax.fsmerge.params import INITS, init_transform, parameterisation
from mergejax.fsmerge.plan import make_plan
from mergejax.fsmerge.widths import resize
from mergejax.kernels.keys import seed_from_key
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec, for_model


@dataclasses.dataclass
class Setup:
    """An FS-Merge fit ready to run: `problem.loss(mu, consts, batch)` on `data`."""

    model: Model  # the merged model (at the merged width)
    problem: FSProblem
    mu: Any
    consts: dict
    data: dict[str, np.ndarray]
    settings: FitSettings
    seed: int


def initial_transforms(plan, init: str, num_models: int) -> dict[str, tuple]:
    """`{space: (merge, unmerge)}` of the "first" or "average" initialisation."""
    return {name: init_transform(init, d, d_new, num_models, groups)
            for name, d, d_new, groups in plan.spaces}


def setup(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
          task_images: Sequence[np.ndarray], *, key: jax.Array, width: float = 1.0,
          init: str = "first", param: str = "diagonal_and_low_rank", rank: int = 12,
          objective: str = "global", steps: int = 1000, batch_size: int = 128,
          lr: float = 1e-4, weight_decay: float = 1e-3, schedule: str = "onecycle",
          augment: int = 8, init_transforms: Mapping[str, tuple] | None = None) -> Setup:
    """Everything an FS-Merge fit needs (arguments as `mergejax.methods.fs_merge`).

    `init_transforms` (`{space: (merge (d', N*d), unmerge (N*d, d'))}`) is required for
    init="zipit" (the method computes ZipIt!'s match) and ignored otherwise.
    """
    if init not in INITS:
        raise ValueError(f"FS-Merge init must be one of {INITS}, got {init!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"FS-Merge objective must be one of {OBJECTIVES}, got {objective!r}")
    n = len(endpoints)
    merged_model = resize(model, width)
    merged_spec = for_model(merged_model)
    plan = make_plan(spec, merged_spec)
    if f"params/{model.head}" not in [t.name for t in plan.tails]:
        raise ValueError(f"FS-Merge needs the head params/{model.head} among the spec's tails "
                         f"(layers kept per endpoint); it has {[t.name for t in plan.tails]}")
    if init == "zipit":
        if init_transforms is None:
            raise ValueError("init='zipit' needs init_transforms (ZipIt!'s match)")
        transforms = init_transforms
    else:
        transforms = initial_transforms(plan, init, n)
    stacked = stack(endpoints)
    frozen = frozen_state(plan, transforms, n)
    seed = seed_from_key(key)
    mu = init_mu(plan, parameterisation(param), frozen, stacked, key, rank)
    data = fitting_data(model, endpoints, task_images, augment=augment, seed=seed)
    taps = tuple((s.name, s.tap, plan.consumer(s.name)) for s in merged_spec.spaces
                 if s.tap is not None and plan.consumer(s.name) is not None)
    problem = FSProblem(plan, merged_model, model, param, objective, n,
                        train="batch_stats" in endpoints[0],
                        taps=taps if objective == "local" else ())
    settings = FitSettings(steps, batch_size, lr,
                           weight_decay, schedule)
    return Setup(merged_model, problem, mu, {"frozen": frozen, "stacked": stacked}, data,
                 settings, seed)


def fit_setup(s: Setup, desc: str = "fs_merge", mesh: Mesh | None = None
              ) -> tuple[Any, dict[str, list[float]]]:
    """Fits `s.mu` data-parallel over `mesh`'s `data` axis (default every device; `fit_loop`);
    returns (fitted mu, `{"loss": [...]}`)."""
    return fit_loop(s.problem, s.mu, s.consts, s.data, s.settings, seed=s.seed, desc=desc,
                    mesh=mesh)


def fold_setup(s: Setup, mu: Any) -> list[Variables]:
    """One variable tree per endpoint for `s.model`: folded trunk + endpoint i's folded head
    (BatchNorm running statistics are the init's merge: recompute them for BatchNorm models)."""
    p = s.problem
    return folded(p.plan, p.param, s.consts["frozen"], mu, s.consts["stacked"])
