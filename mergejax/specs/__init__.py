"""Merge specs of architectures and `apply_merge`, which applies any matching to any of them."""

from mergejax.specs.apply import apply_merge, identity_transforms, permutation_transforms
from mergejax.specs.architectures import for_model, names, register
from mergejax.specs.spec import Axis, MergeSpec, Space, SpecBuilder, flatten, unflatten

__all__ = ["Axis", "MergeSpec", "Space", "SpecBuilder", "apply_merge", "flatten", "for_model",
           "identity_transforms", "names", "permutation_transforms", "register", "unflatten"]
