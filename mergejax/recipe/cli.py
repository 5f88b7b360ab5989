"""The command line: `python -m mergejax.recipe RECIPE.yml --out-dir DIR` (see `parser`).

Errors are one message on stderr (`mergejax.io.cli_errors.run_cli`): exit 2 for usage errors
(bad arguments, a bad recipe, a refused --out-dir), 1 for failures (unreadable or broken inputs,
a non-finite result); `--debug` or MERGEJAX_DEBUG=1 adds the traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from mergejax.io.atomic import remove_stale_temporaries
from mergejax.io.cli_errors import ArgumentParser, UsageError, run_cli
from mergejax.kernels import processes
from mergejax.recipe import checkpoint_io
from mergejax.recipe.checkpoint_io import ORBAX_NAME, RECIPE_NAME, SAFETENSORS_NAME
from mergejax.recipe.execute import assign_tensors
from mergejax.recipe.hf_io import Source, input_kind
from mergejax.recipe.output import run
from mergejax.recipe.resolve import plan
from mergejax.recipe.schema import DTYPES, METHODS, PARAMETERS, TOP_LEVEL, RecipeError
from mergejax.recipe.shards import parse_size
from mergejax.recipe.stream import DEFAULT_SHARD
from mergejax.recipe.validate import load_recipes

PROG = "python -m mergejax.recipe"


def _epilog() -> str:
    lines = ["supported merge methods, then their parameters=defaults:"]
    for m in METHODS.values():
        lines.append(f"  {m.name:17s}{m.doc}")
        lines.append(f"  {'':17s}" + ", ".join(f"{p}={m.defaults[p]}" if p in m.defaults
                                               else f"{p} (required)" for p in m.params))
    lines.append("parameters (scope: model = per model or global default; global = top level):")
    for p, (scope, _, _, doc) in PARAMETERS.items():
        lines.append(f"  {p:11s}{scope:7s} {doc}")
    lines += ["values: scalar | gradient [a, b, ...] over layers | [{filter: substr, value: v}, "
              "...] (first match wins, '*' = all)",
              f"top-level keys: {', '.join(TOP_LEVEL)}; dtype/out_dtype: {', '.join(DTYPES)}",
              "inputs: orbax checkpoint directories or .safetensors files of flat Flax variables "
              "('params/dense_0/kernel'); floating point and finite (see --allow-nonfinite)",
              "  or PyTorch/Hugging Face checkpoints in their own naming, merged out of core "
              "one tensor at a time: a .safetensors file, a directory with "
              "model.safetensors.index.json (sharded) or model.safetensors, a .bin/.pt state "
              "dict; output: sharded .safetensors + index in the same names and dtypes, the "
              "base's config/tokenizer files (transformers from_pretrained loads it)",
              "exit status: 0 done, 1 failure (unreadable or broken input, non-finite result), "
              "2 usage error (bad arguments or recipe, refused --out-dir)"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog=PROG, epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge checkpoints with a mergekit-style YAML recipe "
                    "(also installed as `mergejax-recipe RECIPE.yml OUT_DIR`). mergejax "
                    f"inputs: writes DIR/{SAFETENSORS_NAME}, DIR/{ORBAX_NAME}/ and "
                    f"DIR/{RECIPE_NAME}; PyTorch/Hugging Face inputs: sharded safetensors, out "
                    "of core.")
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("out", nargs="?", metavar="OUT_DIR",
                   help="output directory (or --out-dir; required unless --dry-run)")
    p.add_argument("--out-dir", help="output directory (same as OUT_DIR)")
    p.add_argument("--max-shard-size", type=_size, default=DEFAULT_SHARD,
                   help="PyTorch/HF inputs: largest output shard, e.g. 5GB, 500MB, 2GiB "
                        f"(default {DEFAULT_SHARD})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr, tensors and bytes (default: when stderr is "
                        "a terminal)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of DARE's drops (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out-dir (never one holding an input)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="read inputs with NaN/inf values (a non-finite result is still never "
                        "written)")
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes sharing the merge of PyTorch/HF checkpoints "
                        "(jax.distributed; every process runs the same command, each merges "
                        "and writes every N-th output shard): see --coordinator")
    p.add_argument("--coordinator", help="with --distributed: host:port of process 0 (env "
                                         "MERGEJAX_COORDINATOR; default: detected by JAX on "
                                         "Slurm / Cloud TPU)")
    p.add_argument("--num-processes", type=int,
                   help="with --distributed: number of processes (env MERGEJAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int,
                   help="with --distributed: this process's index (env MERGEJAX_PROCESS_ID)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, load and print the per-tensor plan; write nothing")
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tensor_names(path: Path, allow_nonfinite: bool) -> list[str]:
    if input_kind(path) == "hf":  # headers only, nothing loaded
        return sorted(n for n, i in Source(path).infos.items() if i.dtype.kind in "fV")
    return sorted(checkpoint_io.read_model(path, allow_nonfinite=allow_nonfinite)[0])


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.out and args.out_dir and Path(args.out) != Path(args.out_dir):
        raise UsageError(f"two output directories given: {args.out} and --out-dir "
                         f"{args.out_dir}")
    args.out_dir = args.out_dir or args.out
    if not args.dry_run and not args.out_dir:
        raise UsageError("--out-dir is required (or pass --dry-run)")
    from mergejax.io import compile_cache

    # before the first compile: a later merge of the same shapes loads the merge kernels
    # instead of compiling them (~2 s on a 7B-layout model); MERGEJAX_COMPILE_CACHE=off
    compile_cache.enable()
    if args.distributed:
        processes.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise UsageError("--coordinator, --num-processes and --process-id need --distributed")
    writer = jax.process_index() == 0
    if args.out_dir and writer:
        remove_stale_temporaries(Path(args.out_dir).absolute().parent)
    recipes = load_recipes(args.recipe)
    if args.dry_run:
        names = _tensor_names(recipes[0].members[0].path, args.allow_nonfinite)
        for j, (recipe, block) in enumerate(zip(recipes, assign_tensors(recipes, names))):
            if len(recipes) > 1:
                print(f"document {j}: {recipe.method.name} on {len(block)} tensor(s)")
            for i, g in enumerate(plan(recipe, block) if block else []):
                models = "; ".join(f"{m.ref}: {mp}" for m, mp in zip(recipe.members,
                                                                     g.model_params) if mp)
                print(f"group {i}: {g.params} {models}\n  " + "\n  ".join(g.names))
        return 0
    summary = run(recipes, args.out_dir, seed=args.random_seed, overwrite=args.overwrite,
                  source=Path(args.recipe).read_text(), allow_nonfinite=args.allow_nonfinite,
                  max_shard_size=args.max_shard_size,
                  progress=sys.stderr.isatty() if args.progress is None else args.progress)
    if writer:
        print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status: 0, 1 (failure) or 2 (usage error: bad arguments,
    bad recipe, refused --out-dir), with one message on stderr."""
    return run_cli(_main, argv, prog=PROG, usage=(RecipeError,))
