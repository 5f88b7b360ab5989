"""The "learned" family's contract: merges fitted on a few images per task (FS-Merge, RegMean,
distillation).

A learned method runs the endpoints (and fits parameters) itself, so unlike a matching method it
receives the model and each task's images::

    fn(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
       task_images: Sequence[np.ndarray], *, key: jax.Array, **hparams) -> LearnedMerge

- `endpoints[i]` was trained on task i; `task_images[i]` is an (n_i, H, W, C) float32 array of
  task i's training images (the image budget already applied by the caller; augmentation, if
  any, is the method's business). A method must reconstruct task i's features from task i's
  images only.
- Hyperparameter defaults live in the signature, as for every family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from mergejax.models import Model, Variables


@dataclasses.dataclass(frozen=True)
class LearnedMerge:
    """What a learned method returns.

    Attributes:
      model: the merged architecture (the endpoints' `Model`, or one built at another width
        when the method merges to a narrower or wider model).
      variables: one tree per endpoint for `model`: the shared merged trunk with endpoint i's
        head (adapted to the merged features), evaluated with task i's classes.
      history: per-step records of the fit, e.g. `{"loss": [...]}` (empty for closed forms).
    """

    model: Model
    variables: Sequence[Variables]
    history: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
