"""Distillation baseline: one model of the target width learns every task's endpoint features.

A student (endpoint 0's weights when the width matches, else a random init) is trained with
FS-Merge's loop, fitting set and step budget to reproduce each task's endpoint head-input
features through a learned per-task linear map P_t (d' -> d, initialised to the identity
alignment). At the end P_t is folded into endpoint t's head (kernel P_t W_t, bias b_t), so the
student is evaluated like an FS-Merge: one shared trunk, each task's own head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mergejax.fsmerge.data import fitting_data
from mergejax.fsmerge.features import head_width
from mergejax.fsmerge.fit import FitSettings, fit_loop
from mergejax.fsmerge.objective import forward, mse, select
from mergejax.fsmerge.params import alignment
from mergejax.fsmerge.widths import resize
from mergejax.kernels.keys import seed_from_key
from mergejax.models import Model, Variables
from mergejax.specs import flatten, unflatten


@dataclasses.dataclass(frozen=True)
class DistillProblem:
    """`loss(mu, consts, batch)`: mu = `{"params": student params without the head (flat),
    "proj": (d', N*d)}`, consts = `{"state": other collections (BatchNorm statistics)}`, batch
    as `FSProblem`'s (rows weighted by `batch["weight"]` when given)."""

    model: Model
    num_models: int
    train: bool

    def loss(self, mu, consts, batch):
        out, _ = forward(self.model, {**mu["params"], **consts["state"]}, mu["proj"],
                         batch["x"], train=self.train)
        return mse(select(out, batch["ids"], self.num_models), batch["target"],
                   batch.get("weight"))


def distill(model: Model, endpoints: Sequence[Variables], task_images: Sequence[np.ndarray],
            *, key: jax.Array, width: float = 1.0, steps: int = 1000, batch_size: int = 128,
            lr: float = 1e-3, weight_decay: float = 1e-3, schedule: str = "onecycle",
            augment: int = 8, mesh: Mesh | None = None
            ) -> tuple[Model, list[Variables], dict[str, list[float]], np.ndarray]:
    """Trains a student of `width` x the endpoints' width on the endpoints' head inputs.

    Returns (student model, one variable tree per endpoint: the student trunk with endpoint t's
    head after P_t, `{"loss": [...]}`, the maps P (d', N*d): P_t = P[:, t*d:(t+1)*d]).
    For BatchNorm students the running statistics are the initial ones: recompute them (the
    fit normalises with batch statistics). `mesh`: the `data` mesh the batches are sharded over
    (default every device; `fit_loop`).
    """
    seed = seed_from_key(key)
    n = len(endpoints)
    student = resize(model, width)
    data = fitting_data(model, endpoints, task_images, augment=augment, seed=seed)
    d = head_width(model, endpoints[0])
    head = f"params/{model.head}/"
    if student is model:
        init = flatten(jax.tree.map(np.asarray, endpoints[0]))
    else:
        init = flatten(jax.tree.map(np.asarray, student.init(key, jnp.asarray(data["x"][:1]))))
    d_new = head_width(student, unflatten(init))
    params = {k: jnp.asarray(v) for k, v in init.items()
              if k.startswith("params/") and not k.startswith(head)}
    state = {k: jnp.asarray(v) for k, v in init.items() if not k.startswith("params/")}
    proj = jnp.asarray(np.tile(alignment(d, d_new), (1, n)))  # (d', N*d)
    problem = DistillProblem(student, n, train=bool(state))
    settings = FitSettings(steps, batch_size, lr, weight_decay, schedule)
    mu, history = fit_loop(problem, {"params": params, "proj": proj}, {"state": state}, data,
                           settings, seed=seed, desc="distill", mesh=mesh)
    trees = []
    for t, end in enumerate(endpoints):
        flat_end = flatten(end)
        p_t = np.asarray(mu["proj"])[:, t * d:(t + 1) * d]  # (d', d)
        heads = {k: np.asarray(v) for k, v in flat_end.items() if k.startswith(head)}
        heads[f"{head}kernel"] = p_t @ np.asarray(flat_end[f"{head}kernel"], np.float32)
        trees.append(unflatten({**mu["params"], **jax.tree.map(np.asarray, state), **heads}))
    return student, trees, history, np.asarray(mu["proj"])


