"""CLI: torch checkpoints to mergejax (orbax) checkpoints and back.

    python -m mergejax.converters to-flax --arch resnet20 --width 4 --num-classes 10 IN.pt OUT_DIR
    python -m mergejax.converters to-torch OUT_DIR OUT.safetensors
    python -m mergejax.converters to-flax --arch clip_vit_b_16 --select visual. clip.pt OUT_DIR

`to-flax` records the architecture, model kwargs and input shape in the checkpoint's meta, so
`to-torch` needs no flags for a checkpoint it wrote (flags given override the meta). ViTs need
no `--input-shape` (read off the position embeddings); `--select PREFIX` converts only the keys
starting with PREFIX (open_clip's `visual.` tower of a full CLIP checkpoint).

Nothing is deleted that was not asked for: an existing non-empty output is refused unless
`--overwrite`, an output that is, contains or lies inside the input always; outputs are written
under a temporary name and renamed (leftovers of killed runs are removed at the next start).
Weights must be floating point and finite (`--allow-nonfinite` lets NaN/inf through). Errors are
one line on stderr: exit 2 for usage errors (bad arguments, refused output), 1 for failures
(unreadable or broken checkpoint, conversion error); `--debug` or MERGEJAX_DEBUG=1 adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mergejax.converters import (
    architectures,
    from_torch,
    load_state_dict,
    save_state_dict,
    to_torch,
)
from mergejax.io import checkpoint
from mergejax.io.atomic import check_output_path, remove_stale_temporaries
from mergejax.io.cli_errors import ArgumentParser, UsageError, run_cli

PROG = "python -m mergejax.converters"


def _tuples(value):
    """JSON lists as tuples: model fields such as `hidden` must be hashable."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _value(text: str):
    """A command-line value as JSON (numbers, lists, true/false), else the string itself."""
    try:
        return _tuples(json.loads(text))
    except json.JSONDecodeError:
        return text


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, _value(value)


def _input_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in text.split(","))
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected H,W,C, got {text!r}")
    return shape


def _model_flags(p: argparse.ArgumentParser, arch_required: bool) -> None:
    p.add_argument("--arch", required=arch_required, choices=architectures(),
                   help="model name in mergejax.models.create")
    p.add_argument("--width", type=_value, help="width multiplier")
    p.add_argument("--num-classes", type=int, help="classes of the head")
    p.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="K=V",
                   help="any other model kwarg, value as JSON (e.g. depth=32, hidden=[64,64])")
    p.add_argument("--input-shape", type=_input_shape, metavar="H,W,C",
                   help="example input shape, where it changes parameter shapes (mlp; ViTs "
                        "infer it from the checkpoint)")


def _kwargs(args) -> dict:
    kwargs = dict(args.model_arg)
    if args.width is not None:
        kwargs["width"] = args.width
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return kwargs


def _prepare_output(args) -> Path:
    """Removes stale temporaries beside the output, then refuses an output that would replace
    something not asked for (see the module docstring). Returns the absolute output path."""
    out = Path(args.output).absolute()
    remove_stale_temporaries(out.parent)
    return check_output_path(out, inputs=[args.input], overwrite=args.overwrite)


def cmd_to_flax(args) -> None:
    """IN (torch file) -> OUT_DIR (orbax checkpoint with meta arch / model_kwargs / input_shape)."""
    out = _prepare_output(args)
    sd = load_state_dict(args.input, allow_nonfinite=args.allow_nonfinite)
    kwargs = _kwargs(args)
    variables = from_torch(sd, args.arch, input_shape=args.input_shape, select=args.select,
                           allow_nonfinite=args.allow_nonfinite, **kwargs)
    steps = [int(v) for k, v in sd.items() if k.endswith("num_batches_tracked")]
    meta = {"arch": args.arch, "model_kwargs": kwargs, "input_shape": args.input_shape,
            "num_batches_tracked": max(steps, default=0), "source": str(args.input)}
    checkpoint.save(out, variables, meta)  # atomic; the output was checked above
    print(f"wrote {args.output} ({args.arch}, {kwargs})")


def cmd_to_torch(args) -> None:
    """IN_DIR (orbax checkpoint) -> OUT (.pt / .pth / .bin / .safetensors)."""
    out = _prepare_output(args)
    if not checkpoint.exists(args.input):
        raise FileNotFoundError(f"no complete checkpoint at {Path(args.input).absolute()} "
                                f"(expected {checkpoint.STATE}/ and {checkpoint.META})")
    meta = checkpoint.load_meta(args.input)
    arch = args.arch or meta.get("arch")
    if arch is None:
        raise UsageError(f"{args.input}: no 'arch' in the checkpoint's meta; pass --arch")
    kwargs = {**_tuples(meta.get("model_kwargs", {})), **_kwargs(args)}
    input_shape = args.input_shape or meta.get("input_shape")
    variables = checkpoint.load(args.input, allow_nonfinite=args.allow_nonfinite)
    sd = to_torch(variables, arch, input_shape=input_shape,
                  num_batches_tracked=meta.get("num_batches_tracked", 0), **kwargs)
    save_state_dict(sd, out, {"arch": arch, "model_kwargs": json.dumps(kwargs)})
    print(f"wrote {args.output} ({arch}, {kwargs})")


def _io_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (refused otherwise; never the input itself)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN/inf weights (refused otherwise, naming the tensor)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (subcommands `to-flax`, `to-torch`)."""
    p = ArgumentParser(
        prog=PROG,
        description="Convert PyTorch state_dicts (.pt/.pth/.bin/.safetensors) to mergejax orbax "
                    "checkpoints and back. Architectures: " + ", ".join(architectures()) + ".",
        epilog="exit status: 0 done, 1 failure (unreadable or broken checkpoint, conversion "
               "error), 2 usage error (bad arguments, refused output); --debug or "
               "MERGEJAX_DEBUG=1 prints the traceback")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    a = sub.add_parser("to-flax", help="torch file -> orbax checkpoint directory")
    _model_flags(a, arch_required=True)
    a.add_argument("--select", metavar="PREFIX",
                   help="convert only the keys starting with PREFIX, ignore the rest (e.g. "
                        "visual. for open_clip's image tower of a full CLIP checkpoint)")
    a.add_argument("input", help="state_dict file (.pt, .pth, .bin, .safetensors)")
    a.add_argument("output", help="checkpoint directory to write")
    _io_flags(a)
    a.set_defaults(run=cmd_to_flax)
    b = sub.add_parser("to-torch", help="orbax checkpoint directory -> torch file")
    _model_flags(b, arch_required=False)
    b.add_argument("input", help="checkpoint directory (from to-flax or training)")
    b.add_argument("output", help="file to write (.pt, .pth, .bin, .safetensors)")
    _io_flags(b)
    b.set_defaults(run=cmd_to_torch)
    return p


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    args.run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status: 0, 1 (failure) or 2 (usage error), with one
    message on stderr (`mergejax.io.cli_errors.run_cli`)."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
