"""mergekit-style YAML recipes for Flax checkpoints: `python -m mergejax.recipe R.yml --out-dir D`.

    merge_method: ties                      # see METHODS / --help
    base_model: ckpt/base                   # orbax checkpoint directory or .safetensors file
    models:
      - model: ckpt/task0
        parameters: {weight: 1.0, density: [1.0, 0.5]}      # gradient over the layers
      - model: ckpt/task1
        parameters: {density: [{filter: linear, value: 0.2}, {value: 0.6}]}   # first match wins
    parameters: {lambda: 1.0, normalize: true}              # global defaults
    dtype: float32                          # compute dtype: inputs are cast before merging
    out_dtype: float16                      # storage dtype (default: the input dtype)

Phases, one module each: `validate` (`load_recipe`/`parse`) checks the whole recipe against the
tables of `schema` (method, parameter names, scopes, value types and ranges, input files) before
any checkpoint is read; `checkpoint_io` (`read_model`) loads the inputs (identical trees, shapes
and dtypes required); `resolve` (`plan`) resolves every parameter per tensor (gradients over the
layer position, filters, precedence) and groups the tensors sharing resolved values; `execute`
(`merge`) calls the mergejax method once per group; `output` (`run`) writes
`DIR/model.safetensors`, `DIR/orbax/` and `DIR/recipe.yml` atomically; `cli` is the command line.
Paths are relative to the working directory, as in mergekit.

PyTorch / Hugging Face inputs (a .safetensors file, a sharded directory with
`model.safetensors.index.json`, .bin/.pt state dicts; `hf_io`) are merged out of core instead,
one tensor at a time (`stream`): sharded safetensors + index in the inputs' own names and
dtypes (`shards`), whole-model TIES thresholds from streamed histograms (`thresholds`).
Console script: `mergejax-recipe RECIPE.yml OUT_DIR`.
"""

from mergejax.recipe.checkpoint_io import (
    ORBAX_NAME,
    RECIPE_NAME,
    SAFETENSORS_NAME,
    Flat,
    check_same_trees,
    load_flat_safetensors,
    read_model,
    save_flat_safetensors,
)
from mergejax.recipe.cli import main, parser
from mergejax.recipe.execute import assign_tensors, merge, merge_flats
from mergejax.recipe.output import run
from mergejax.recipe.resolve import (
    COLLECTIONS,
    HEADS,
    Group,
    evaluate_setting,
    layer_key,
    layer_positions,
    plan,
)
from mergejax.recipe.schema import DTYPES, METHODS, PARAMETERS, TOP_LEVEL, Method, RecipeError
from mergejax.recipe.validate import (
    ModelEntry,
    Recipe,
    load_recipe,
    load_recipes,
    parse,
    parse_all,
)

__all__ = [
    "COLLECTIONS", "DTYPES", "HEADS", "METHODS", "ORBAX_NAME", "PARAMETERS", "RECIPE_NAME",
    "SAFETENSORS_NAME", "TOP_LEVEL", "Flat", "Group", "Method", "ModelEntry", "Recipe",
    "RecipeError", "assign_tensors", "check_same_trees", "evaluate_setting", "layer_key",
    "layer_positions",
    "load_flat_safetensors", "load_recipe", "load_recipes", "main", "merge", "merge_flats",
    "parse", "parse_all", "parser", "plan",
    "read_model", "run", "save_flat_safetensors",
]
