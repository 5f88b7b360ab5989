"""Low-level file I/O: atomic writes, safetensors, orbax checkpoints.

The bottom layer of the run: it imports numpy, jax, orbax and safetensors only, nothing else
from mergejax, so every other layer (converters, recipe, the run) may use it.

- `atomic`: `atomic_write_bytes`, `atomic_write_text`, `atomic_file` and `atomic_dir` (write
  under a temporary sibling name, then `os.replace`); `remove_stale_temporaries` (leftovers of
  killed writes) and `check_output_path` (refuse outputs that would destroy something);
- `check`: `check_tensors`, the one check of weights read from any file (floating, finite);
- `cli_errors`: `run_cli` (one message, exit 2 usage / 1 failure, --debug), `UsageError`,
  `OutputExistsError`, an argparse `ArgumentParser` raising UsageError;
- `safetensors_io`: `read_safetensors` / `write_safetensors` (the one reader and writer; bf16
  kept or upcast to float32 exactly); out of core, `tensor_infos` (header only) and
  `read_tensor` (one tensor at its offset), with the one dtype table `ST_DTYPES`;
- `checkpoint`: orbax checkpoints with a `meta.json` (`exists`, `save`, `load`, `load_meta`).
"""
