"""CLI: torch checkpoints to mergejax (orbax) checkpoints and back.

    python -m mergejax.converters to-flax --arch resnet20 --width 4 --num-classes 10 IN.pt OUT_DIR
    python -m mergejax.converters to-torch OUT_DIR OUT.safetensors

`to-flax` records the architecture, model kwargs and input shape in the checkpoint's meta, so
`to-torch` needs no flags for a checkpoint it wrote (flags given override the meta).
"""

from __future__ import annotations

import argparse
import json
import sys

from mergejax import checkpointing
from mergejax.converters import (
    architectures,
    from_torch,
    load_state_dict,
    save_state_dict,
    to_torch,
)


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
                   help="example input shape, where it changes parameter shapes (mlp)")


def _kwargs(args) -> dict:
    kwargs = dict(args.model_arg)
    if args.width is not None:
        kwargs["width"] = args.width
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return kwargs


def cmd_to_flax(args) -> None:
    """IN (torch file) -> OUT_DIR (orbax checkpoint with meta arch / model_kwargs / input_shape)."""
    sd = load_state_dict(args.input)
    kwargs = _kwargs(args)
    variables = from_torch(sd, args.arch, input_shape=args.input_shape, **kwargs)
    steps = [int(v) for k, v in sd.items() if k.endswith("num_batches_tracked")]
    meta = {"arch": args.arch, "model_kwargs": kwargs, "input_shape": args.input_shape,
            "num_batches_tracked": max(steps, default=0), "source": str(args.input)}
    checkpointing.save(args.output, variables, meta)
    print(f"wrote {args.output} ({args.arch}, {kwargs})")


def cmd_to_torch(args) -> None:
    """IN_DIR (orbax checkpoint) -> OUT (.pt / .pth / .bin / .safetensors)."""
    meta = checkpointing.load_meta(args.input) if checkpointing.exists(args.input) else {}
    arch = args.arch or meta.get("arch")
    if arch is None:
        raise ValueError(f"{args.input}: no 'arch' in the checkpoint's meta; pass --arch")
    kwargs = {**_tuples(meta.get("model_kwargs", {})), **_kwargs(args)}
    input_shape = args.input_shape or meta.get("input_shape")
    variables = checkpointing.load(args.input)
    sd = to_torch(variables, arch, input_shape=input_shape,
                  num_batches_tracked=meta.get("num_batches_tracked", 0), **kwargs)
    save_state_dict(sd, args.output, {"arch": arch, "model_kwargs": json.dumps(kwargs)})
    print(f"wrote {args.output} ({arch}, {kwargs})")


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (subcommands `to-flax`, `to-torch`)."""
    p = argparse.ArgumentParser(
        prog="python -m mergejax.converters",
        description="Convert PyTorch state_dicts (.pt/.pth/.bin/.safetensors) to mergejax orbax "
                    "checkpoints and back. Architectures: " + ", ".join(architectures()) + ".")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-flax", help="torch file -> orbax checkpoint directory")
    _model_flags(a, arch_required=True)
    a.add_argument("input", help="state_dict file (.pt, .pth, .bin, .safetensors)")
    a.add_argument("output", help="checkpoint directory to write")
    a.set_defaults(run=cmd_to_flax)
    b = sub.add_parser("to-torch", help="orbax checkpoint directory -> torch file")
    _model_flags(b, arch_required=False)
    b.add_argument("input", help="checkpoint directory (from to-flax or training)")
    b.add_argument("output", help="file to write (.pt, .pth, .bin, .safetensors)")
    b.set_defaults(run=cmd_to_torch)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (1 with a one-paragraph message on bad input)."""
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
