"""Out-of-core recipe merges of sharded bf16 checkpoints: peak RSS and throughput (issue 18).

    python bench/bench_out_of_core.py [--layers 9] [--workdir /tmp/mergejax_ooc]

Builds three synthetic bf16 Llama-layout checkpoints (base + 2 fine-tuned; hidden 4096, MLP
11008, vocab 32000, 9 layers: 2.08e9 parameters = 4.2 GB each, ~1 GB shards, HF
`model.safetensors.index.json` + config.json, so mergekit reads them too), then times in child
processes, each measured by `os.wait4` (peak RSS of that child alone):

- limit: every input read once with `safetensors.safe_open` and the output written once with
  `safetensors.numpy.save_file`, no merge (the machine's I/O limit in this run);
- mergejax linear / task_arithmetic / ties (per-tensor trim) / ties scope: global (a row
  sample, one threshold sweep, then the merge sweep): `python -m mergejax.recipe R.yml OUT`;
- mergekit ties (in its own venv, `mergekit-yaml`, if present): the in-memory alternative;
- `<run>@<N>p` (e.g. `linear@2p`): the same recipe split over N local processes
  (`--distributed`, each merging every N-th output shard); peak RSS is the largest process's.

Throughput = (input bytes read once + output bytes) / wall time; goals (issue 18): peak RSS
below one model's size, one-sweep merges at >= 70% of the limit. Synthetic files are deleted
at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MERGEKIT = Path("/work/venv-mergekit/bin/mergekit-yaml")


def llama_shapes(layers: int, hidden=4096, mlp=11008, vocab=32000) -> list[tuple[str, tuple]]:
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)),
                (p + "post_attention_layernorm.weight", (hidden,))]
        out += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (mlp, hidden)), (p + "mlp.up_proj.weight",
                                                              (mlp, hidden)),
                (p + "mlp.down_proj.weight", (hidden, mlp))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def make_model(folder: Path, shapes, base: Path | None, seed: int, shard_bytes: int,
               config: dict) -> int:
    """Writes one bf16 checkpoint (HF layout); fine-tuned = base bits + a few ulps. Returns its
    size in bytes."""
    import ml_dtypes
    import safetensors.numpy

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    shards, cur, size, total = [], {}, 0, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        if base is None:  # |x| in [2^-10, 2^-3): exponents 117..123, random sign and mantissa
            bits = (rng.integers(117, 124, n, dtype=np.uint16) << 7) | rng.integers(
                0, 128, n, dtype=np.uint16) | (rng.integers(0, 2, n, dtype=np.uint16) << 15)
        else:
            bits = _base_bits(base, name) + rng.integers(-3, 4, n, dtype=np.int16).view(
                np.uint16)
        cur[name] = bits.view(bf16).reshape(shape)
        size += 2 * n
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for i, sd in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(sd, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in sd})
        total += sum(v.nbytes for v in sd.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return total


def _base_bits(base: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(base / index[name], "numpy") as f:
        return f.get_tensor(name).reshape(-1).view(np.uint16)


LIMIT = """
import json, sys
from pathlib import Path
import ml_dtypes, safetensors.numpy
from safetensors import safe_open
models, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
out.mkdir()
index = json.loads((models[0] / "model.safetensors.index.json").read_text())["weight_map"]
for fname in sorted(set(index.values())):
    keep = {}
    for i, m in enumerate(models):
        with safe_open(m / fname, "numpy") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if i == 0:
                    keep[k] = t
                del t
    safetensors.numpy.save_file(keep, str(out / fname), metadata={"format": "pt"})
    del keep
"""


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def measure(cmds: list[list[str]], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds until the last command ends, peak RSS GiB of the largest child process):
    the commands run concurrently (the processes of one distributed merge).

    The peak is each child's VmHWM (/proc, polled every 50 ms; it only grows, so the last read
    is the peak up to the final 50 ms). Not `ru_maxrss` of wait4: Linux carries the parent's
    high-water mark into a forked child, so it would report the bench's own peak."""
    t = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    peak = [0] * len(procs)
    while any(p.poll() is None for p in procs):
        peak = [max(k, _hwm_kb(p.pid)) for k, p in zip(peak, procs)]
        time.sleep(0.05)
    wall = time.perf_counter() - t
    for cmd, p in zip(cmds, procs):
        err = p.stderr.read()
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err[-2000:]}")
    return wall, max(peak) / 2**20


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9, help="9 -> 4.2 GB per model")
    ap.add_argument("--workdir", default="/tmp/mergejax_ooc")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--runs", default="limit,linear,ties,ties_global,mergekit_ties")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints of --workdir")
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(args.layers)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": args.layers,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
    names = ["base", "ft0", "ft1"]
    try:
        t = time.perf_counter()
        if args.make:  # the child that writes the synthetic checkpoints
            make_model(work / "base", shapes, None, 0, int(args.shard_gb * 1e9), config)
            for i, n in enumerate(names[1:]):
                make_model(work / n, shapes, work / "base", i + 1, int(args.shard_gb * 1e9),
                           config)
            return
        if not (args.reuse and all((work / n).is_dir() for n in names)):
            # in a child, so that this process stays small (its memory is not measured)
            subprocess.run([sys.executable, __file__, "--make", "--keep", "--layers",
                            str(args.layers), "--workdir", str(work), "--shard-gb",
                            str(args.shard_gb)], check=True)
        size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
        largest = max(2 * int(np.prod(s)) for _, s in shapes)
        for d in [*work.glob("out_*"), *work.glob(".out_*")]:  # an interrupted run's
            shutil.rmtree(d, ignore_errors=True)
        print(f"# 3 models x {size / 1e9:.2f} GB bf16 ({len(shapes)} tensors, largest "
              f"{largest / 1e6:.0f} MB, {args.shard_gb} GB shards), made in "
              f"{time.perf_counter() - t:.0f} s; {os.cpu_count()} CPU(s)", flush=True)
        moved = 4 * size  # three inputs read once + one output written
        gta = {"base_model": str(work / "base"),
               "models": [{"model": str(work / n)} for n in names[1:]]}
        recipes = {
            "linear": {"merge_method": "linear",
                       "models": [{"model": str(work / n)} for n in names]},
            "task_arithmetic": {"merge_method": "task_arithmetic", **gta,
                                "parameters": {"lambda": 0.5}},
            "ties": {"merge_method": "ties", **gta, "parameters": {"density": args.density}},
            "ties_global": {"merge_method": "ties", **gta,
                            "parameters": {"density": args.density, "scope": "global"}},
        }
        rows = []
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        for run in args.runs.split(","):
            out, cmds = work / f"out_{run}", None
            if run == "limit":
                cmd = [sys.executable, "-c", LIMIT, *(str(work / n) for n in names), str(out)]
            elif run.startswith("mergekit"):
                if not MERGEKIT.exists():
                    print(f"# {run}: {MERGEKIT} not found, skipped")
                    continue
                cfg = work / f"{run}.yml"
                mk = {"merge_method": "ties", "base_model": str(work / "base"), "dtype": "bfloat16",
                      "models": [{"model": str(work / n), "parameters": {
                          "weight": 1.0, "density": args.density}} for n in names[1:]],
                      "parameters": {"normalize": True}}
                cfg.write_text(json.dumps(mk))
                cmd = [str(MERGEKIT), str(cfg), str(out), "--lazy-unpickle", "--quiet",
                       "--no-copy-tokenizer", "--no-write-model-card"]
            else:  # "<recipe>" in one process, "<recipe>@<N>p" on N local processes
                name, _, procs = run.partition("@")
                cfg = work / f"{name}.yml"
                cfg.write_text(json.dumps(recipes[name]))
                cmd = [sys.executable, "-m", "mergejax.recipe", str(cfg), str(out),
                       "--max-shard-size", f"{args.shard_gb}GB", "--no-progress"]
                if procs:
                    n, port = int(procs.rstrip("p")), _free_port()
                    cmds = [cmd + ["--distributed", f"--coordinator=localhost:{port}",
                                   f"--num-processes={n}", f"--process-id={i}"]
                            for i in range(n)]
            wall, rss = measure(cmds or [cmd], env)
            rows.append((run, wall, moved / wall / 1e9, rss))
            print(f"# {run}: {wall:.1f} s, {moved / wall / 1e9:.2f} GB/s, peak RSS {rss:.2f} GiB",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
        limit = next((r[2] for r in rows if r[0] == "limit"), None)
        print(f"\n| run | wall s | GB/s (3 in + 1 out) | % of limit | peak RSS GiB | RSS / "
              f"model ({size / 2**30:.2f} GiB) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for run, wall, gbs, rss in rows:
            pct = f"{100 * gbs / limit:.0f}%" if limit else "-"
            print(f"| {run} | {wall:.1f} | {gbs:.2f} | {pct} | {rss:.2f} | "
                  f"{rss / (size / 2**30):.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
