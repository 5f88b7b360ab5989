"""Distillation baseline of the FS-Merge paper: one student of the target width fitted to every
task's endpoint features with the same image budget and steps (`mergejax.fsmerge.distill`)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from mergejax import fsmerge
from mergejax.fsmerge.fit import SCHEDULES
from mergejax.methods.learned import LearnedMerge
from mergejax.methods.registry import register
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec


@register("distill", "learned",
          checks={"width": "(0, inf)", "steps": "int [1, inf)", "batch_size": "int [1, inf)",
                  "lr": "(0, inf)", "weight_decay": "[0, inf)",
                  "schedule": tuple(SCHEDULES.names()), "augment": "int [0, inf)"})
def distill(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
            task_images: Sequence[np.ndarray], *, key: jax.Array, width: float = 1.0,
            steps: int = 1000, batch_size: int = 128, lr: float = 1e-3,
            weight_decay: float = 1e-3, schedule: str = "onecycle",
            augment: int = 8) -> LearnedMerge:
    """Knowledge distillation of the endpoints' head-input features into one model.

    The student starts from endpoint 0 at the endpoints' width (random at another `width`);
    a per-task linear map to endpoint t's features is folded into endpoint t's head, so the
    student is evaluated like a merge (shared trunk, each task's head). AdamW (`lr`,
    `weight_decay`, `schedule`) for `steps` batches of `batch_size` images from the task
    images plus `augment` shifted copies of each. For BatchNorm students recompute the running
    statistics afterwards.
    """
    del spec  # the student is a whole model: no spec needed
    student, trees, history, _ = fsmerge.distill(
        model, endpoints, task_images, key=key, width=width, steps=steps,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
        augment=augment)
    return LearnedMerge(student, trees, history)
