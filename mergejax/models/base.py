"""The functional surface every model shares: `init`, `apply`, `apply_train`, `features`.

Variables are plain nested dicts (`{'params': ..., 'batch_stats': ...}`), inputs are NHWC.
Each model sows the activations at its feature spaces into the `intermediates` collection
under a *tap* name ("layer1_0/inner"), so statistics are collected without editing the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Variables = dict[str, Any]

# torch's BatchNorm momentum 0.1 is flax's 0.9; eps 1e-5 in both. The fast variance
# (E[x^2] - E[x]^2) cancels catastrophically for large-mean features, so it is off.
BN_KWARGS = dict(momentum=0.9, epsilon=1e-5, use_fast_variance=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A Linen module with a pure functional surface.

    Attributes:
      name: the registry name (`mergejax.models.create(name, **kwargs)`).
      module: the Linen module.
      kwargs: the arguments it was created with (recorded in checkpoints and exports).
      head: top-level name of the task head in `params` (replaced per task in merges).
    """

    name: str
    module: nn.Module
    kwargs: dict
    head: str

    def _key(self) -> tuple:
        return (self.name, self.module, self.head)

    # Equal models share compiled functions (jit and lru caches key on them).
    def __eq__(self, other) -> bool:
        return isinstance(other, Model) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def init(self, rng: jax.Array, x: jax.Array) -> Variables:
        """Initial variables for input `x` (B, H, W, C)."""
        variables = self.module.init(rng, x, train=False)
        return jax.tree.map(jnp.asarray, dict(variables))

    def init_shapes(self, x: jax.Array) -> Variables:
        """Shapes and dtypes of the variables (ShapeDtypeStructs) for input like `x`."""
        return jax.eval_shape(lambda: self.init(jax.random.key(0), jnp.asarray(x)))

    def apply(self, variables: Variables, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (B, num_classes) for `x` (B, H, W, C); eval mode unless `train`."""
        if train:
            return self.apply_train(variables, x)[0]
        return self.module.apply(variables, x, train=False)

    def apply_train(self, variables: Variables, x: jax.Array) -> tuple[jax.Array, Variables]:
        """Train-mode logits and the variables with updated `batch_stats`."""
        if "batch_stats" not in variables:
            return self.module.apply(variables, x, train=True), variables
        logits, updates = self.module.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, {**variables, "batch_stats": updates["batch_stats"]}

    def features(self, variables: Variables, x: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Eval-mode logits and the activation at every tap, `{tap: (B, ..., C)}` (a tap sown
        as row parts is their concatenation along axis 1, see `sow_rows`)."""
        logits, state = self.module.apply(variables, x, train=False, mutable=["intermediates"])
        return logits, tap_activations(state["intermediates"])

    def feature_parts(self, variables: Variables, x: jax.Array
                      ) -> tuple[jax.Array, dict[str, tuple[jax.Array, ...]]]:
        """Like `features`, but every tap as the tuple of its row parts `((B, T_1, C), ...)`
        (one part for a tap sown once): for consumers that pool rows, so that the tap's
        concatenation is never written in their programs."""
        logits, state = self.module.apply(variables, x, train=False, mutable=["intermediates"])
        return logits, tap_activations(state["intermediates"], parts=True)

    def with_bn_momentum(self, momentum: float) -> Model:
        """The same model whose BatchNorm layers use `momentum` (0.0 = store batch statistics).

        BatchNorm reset uses momentum 0 to read each batch's exact statistics.
        """
        return dataclasses.replace(self, module=self.module.clone(bn_momentum=momentum))


def sow_rows(module: nn.Module, tap: str, parts) -> None:
    """Sow the tap `tap` of `module` as row parts: its activation is the concatenation of
    `parts` (B, T_i, C) along axis 1 (`Model.features`), while `Model.feature_parts` hands the
    parts over as they are. Why: statistics pool rows, so they fold the parts one by one, and
    a transformer's concatenated taps (the residual stream of every block, queries + keys +
    attention output) were copies costing 7% of a ViT's statistics collection."""
    for part in parts:
        module.sow("intermediates", tap, part)


def tap_activations(intermediates, parts: bool = False) -> dict:
    """`{tap: activation}` from a module's `intermediates` collection (flat "a/b" names): each
    tap's sown values concatenated along axis 1 (`sow_rows`), or with `parts` their tuple."""
    flat = traverse_util.flatten_dict(dict(intermediates), sep="/")
    if parts:
        return {name: tuple(values) for name, values in flat.items()}
    return {name: values[0] if len(values) == 1 else jnp.concatenate(values, axis=1)
            for name, values in flat.items()}


def batch_norm(train: bool, momentum: float, name: str) -> nn.BatchNorm:
    """Torch-equivalent BatchNorm (eps 1e-5, stable variance); `momentum` in flax's convention."""
    return nn.BatchNorm(use_running_average=not train, name=name,
                        **{**BN_KWARGS, "momentum": momentum})


def conv3x3(features: int, stride: int = 1, use_bias: bool = False, name: str | None = None):
    """A 3x3 convolution with torch's explicit padding 1 (flax 'SAME' differs at stride 2)."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   use_bias=use_bias, name=name)
