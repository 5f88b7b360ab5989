"""The fitting set: each task's images with augmented copies, task ids and head-input targets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergejax.augment import augment as augment_images
from mergejax.fsmerge.features import head_inputs
from mergejax.models import Model, Variables


def fitting_data(model: Model, endpoints: Sequence[Variables],
                 task_images: Sequence[np.ndarray], *, augment: int, seed: int
                 ) -> dict[str, np.ndarray]:
    """`{"x": (m, H, W, C), "ids": (m,) int32 task, "target": (m, d)}`: task t's images and
    `augment` shifted copies of each (seed `seed + t`), with endpoint t's head-input features
    as targets (only endpoint t's: `rec_with_ids`)."""
    if len(task_images) != len(endpoints):
        raise ValueError(f"{len(endpoints)} endpoints but {len(task_images)} image sets: "
                         "one set of task images per endpoint")
    xs, ids, targets = [], [], []
    for t, (images, variables) in enumerate(zip(task_images, endpoints)):
        if len(images) == 0:
            raise ValueError(f"task {t} has no images to fit on")
        x = augment_images(np.asarray(images, np.float32), augment, seed + t)
        xs.append(x)
        ids.append(np.full(len(x), t, np.int32))
        targets.append(head_inputs(model, variables, x))
    return {"x": np.concatenate(xs), "ids": np.concatenate(ids),
            "target": np.concatenate(targets).astype(np.float32)}
