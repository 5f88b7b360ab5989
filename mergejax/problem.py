"""What a matching merge method is given: the models, their spec, and data for statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec


@dataclasses.dataclass
class MatchingProblem:
    """N endpoints of one architecture to merge through its spec.

    Attributes:
      model: the architecture.
      spec: its merge spec.
      endpoints: N variable trees.
      spaces: the spaces to merge, in depth order (all of them, or a prefix for partial zips).
      image_batches: returns a fresh iterable of image batches (B, H, W, C) for statistics.
      key: PRNG key for methods that draw random numbers.
      stats_cache: per-space statistics already collected for these endpoints and batches; a
        run passes one dict to the problems of all its methods, so they are collected once.
    """

    model: Model
    spec: MergeSpec
    endpoints: Sequence[Variables]
    spaces: Sequence[str]
    image_batches: Callable[[], Iterable[np.ndarray]]
    key: jax.Array = dataclasses.field(default_factory=lambda: jax.random.key(0))
    stats_cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_models(self) -> int:
        return len(self.endpoints)

    def statistics(self):
        """Per merged space with a tap, the statistics of the N models' concatenated features
        (collected only for spaces not yet in `stats_cache`)."""
        observed = [s for s in self.spaces if self.spec.space(s).tap is not None]
        missing = [s for s in observed if s not in self.stats_cache]
        if missing:
            from mergejax.statistics import collect

            self.stats_cache.update(collect(self.model, self.spec, self.endpoints,
                                            self.image_batches(), spaces=missing))
        return {s: self.stats_cache[s] for s in observed}
