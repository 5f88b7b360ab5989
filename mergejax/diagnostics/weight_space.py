"""Weight-space diagnostics: how the task vectors of fine-tuned models agree and collide.

Pure functions over parameter trees (a base theta_0 and T fine-tuned trees of its structure),
streamed in fixed-size chunks through one jitted kernel (`task_vector_stats`), so memory stays
at the inputs plus a chunk, as in the merges (`mergejax.methods.task_vectors`):

- `cosine_matrix`: (T, T) cosine similarity of the task vectors tau_t = theta_t - theta_0;
- `sign_conflicts`: per layer, TIES' view: after the top-`density` magnitude trim of every task
  vector (over the whole model, the TIES paper's trim), among the entries kept (non-zero) by at
  least two tasks, the share whose kept signs disagree;
- `tall_shares`: per layer, the share of weights the TALL masks (lambda_t against tau_MTL) leave
  to no task ("catastrophic") and to exactly one ("selfish"), the Consensus paper's counts;
- `task_vector_section`: all three as one report `Section` with its figures.

A "layer" is a leaf's parent module (`Dense_0/kernel` and `Dense_0/bias` are layer `Dense_0`).
Counts are exact integers summed on the host; rates of a layer with nothing to count are 0
(with the count beside them), so every number is finite.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import methods
from mergejax.diagnostics import report
from mergejax.diagnostics.section import Section
from mergejax.diagnostics.sweeps import sweep_section
from mergejax.entries import parse_method
from mergejax.evaluation import task_name
from mergejax.kernels import topk
from mergejax.methods import task_vectors as tv
from mergejax.methods.tall_masks import mask_entries, multitask_vector, prepare_masks


def layer_of(path: str) -> str:
    """The layer of leaf `path`: its parent module (`"Dense_0/kernel"` -> `"Dense_0"`)."""
    head, _, _ = path.rpartition("/")
    return head or path


def _by_layer(paths: Sequence[str], counts: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sums per-leaf rows of `counts` (leaves, ...) into per-layer rows, in first-seen order."""
    layers = list(dict.fromkeys(layer_of(p) for p in paths))
    out = np.zeros((len(layers), *counts.shape[1:]), np.int64)
    for p, c in zip(paths, counts):
        out[layers.index(layer_of(p))] += c
    return layers, out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den as float64, 0 where den == 0 (nothing to count)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


@dataclasses.dataclass(frozen=True)
class LayerCounts:
    """Per-layer counts and their rates.

    Attributes:
      layers: layer names, in the order of the tree's leaves.
      size: (L,) weights per layer.
      counts: name -> (L,) int64 counts; rates: name -> (L,) float64 shares in [0, 1].
      total: name -> the rate over the whole model.
    """

    layers: list[str]
    size: np.ndarray
    counts: dict[str, np.ndarray]
    rates: dict[str, np.ndarray]
    total: dict[str, float]

    def numbers(self) -> dict:
        """The counts and rates as JSON data, per layer and in total."""
        return {"layers": self.layers, "size": self.size.tolist(),
                **{f"{k}_count": v.tolist() for k, v in self.counts.items()},
                **{k: v.tolist() for k, v in self.rates.items()},
                "total": self.total}


@dataclasses.dataclass(frozen=True)
class TaskVectorStats:
    """What `task_vector_stats` measures.

    Attributes:
      cosine: (T, T) float64 cosine similarities of the task vectors.
      conflicts: TIES sign conflicts: counts "shared" (entries kept by >= 2 tasks) and
        "conflict" (of those, kept with both signs); rates conflict = conflict / shared,
        shared = shared / size.
      shares: TALL masks: counts and rates (of the layer's weights) "catastrophic" (no task's
        mask keeps the weight) and "selfish" (exactly one).
    """

    cosine: np.ndarray
    conflicts: LayerCounts
    shares: LayerCounts


# Leaves are cut into 1-D chunks of CHUNK entries (the last one zero-padded), so ONE compiled
# kernel serves every leaf of every model (per dtype and T): it measures everything at once,
# the Gram matrix of the task vectors, TIES' shared / conflicting kept entries and TALL's
# catastrophic / selfish weights. Padding is neutral (tau = 0 is never kept, adds 0 to the
# Gram matrix, is never selected by a mask) except for "no mask keeps it": `n_valid` masks it.
CHUNK = 1 << 16


@jax.jit
def _chunk_stats(base, models, mtv, thr, lams, n_valid):
    taus = [tv.tau(base, m) for m in models]
    flat = jnp.stack(taus)
    gram = flat @ flat.T
    # TIES trim (`merge_leaves`' global trim), and an exact 0 has no sign to disagree with
    kept = [(topk.abs_bits(x) >= thr[t]) & (x != 0) for t, x in enumerate(taus)]
    n_kept = sum(k.astype(jnp.int32) for k in kept)
    n_pos = sum((k & (x > 0)).astype(jnp.int32) for k, x in zip(kept, taus))
    shared = n_kept >= 2
    conflict = shared & (n_pos > 0) & (n_pos < n_kept)
    n_masks = sum(mask_entries(base, f, mtv, lams[t]).astype(jnp.int32)
                  for t, f in enumerate(models))
    valid = jnp.arange(base.shape[0]) < n_valid
    counts = jnp.stack([jnp.sum(shared), jnp.sum(conflict), jnp.sum((n_masks == 0) & valid),
                        jnp.sum(n_masks == 1)]).astype(jnp.int32)
    return gram, counts


def _chunk(x, start: int) -> np.ndarray:
    """Entries [start, start + CHUNK) of leaf `x` flattened, zero-padded to CHUNK."""
    part = np.asarray(x).reshape(-1)[start:start + CHUNK]
    return np.pad(part, (0, CHUNK - part.size))


def _layer_counts(layers, size, counts: dict[str, np.ndarray], rates: dict[str, tuple]
                  ) -> LayerCounts:
    """LayerCounts with rate name -> (numerator count, denominator count or "size")."""
    den = {**counts, "size": size}
    return LayerCounts(layers, size, counts,
                       {k: _ratio(counts[n], den[d]) for k, (n, d) in rates.items()},
                       {k: float(_ratio(counts[n].sum(), den[d].sum()))
                        for k, (n, d) in rates.items()})


def task_vector_stats(base, finetuned: Sequence, *, density: float = 0.2, mask_lam=0.6,
                      merged: str = "sum", mask_density: float = 0.2) -> TaskVectorStats:
    """Cosines, TIES sign conflicts and TALL mask shares of the task vectors theta_t - theta_0.

    Args:
      base: theta_0; finetuned: T trees of its structure and shapes.
      density: TIES' keep fraction in (0, 1]: per task, the top-`density` |tau| over the whole
        model (ties at the threshold kept, `tv.global_thresholds`, as `ties` trims).
      mask_lam: TALL's lambda_t (scalar or one per task): m_t = |theta_0 - theta_t| >
        |theta_0 + tau_MTL - theta_t| * lambda_t, exactly `tall_masks.mask_entries`.
      merged, mask_density: tau_MTL = `tall_masks.multitask_vector(merged, mask_density)`.
    Streams chunk by chunk (`CHUNK`): one compiled kernel for any model; counts are summed
    exactly on the host, the Gram matrix in float64.
    """
    finetuned = list(finetuned)
    density = tv.check_range("density", density, 0, 1, lo_open=True)
    mtv = multitask_vector(base, finetuned, merged=merged, density=mask_density)
    m, mt, lams = prepare_masks(base, finetuned, mtv, mask_lam, "mask_lam")
    thr = jnp.asarray(tv.global_thresholds(m, density))
    sizes = np.asarray([np.size(x) for x in m.base], np.int64)
    chunks = [(i, s) for i, n in enumerate(sizes) for s in range(0, int(n), CHUNK)]

    def run(k):
        i, s = chunks[k]
        base_i, models_i = m.leaf(i)
        return _chunk_stats(_chunk(base_i, s), tuple(_chunk(x, s) for x in models_i),
                            _chunk(mt[i], s), thr, lams, min(CHUNK, int(sizes[i]) - s))

    out = jax.device_get(tv.stream(run, len(chunks)))
    gram = sum(np.asarray(g, np.float64) for g, _ in out)
    norm = np.sqrt(np.diag(gram))
    per_leaf = np.zeros((len(sizes), 4), np.int64)
    for (i, _), (_, c) in zip(chunks, out):
        per_leaf[i] += np.asarray(c, np.int64)
    layers, c = _by_layer(m.paths, np.concatenate([sizes[:, None], per_leaf], axis=1))
    size = c[:, 0]
    conflicts = _layer_counts(layers, size, {"shared": c[:, 1], "conflict": c[:, 2]},
                              {"conflict": ("conflict", "shared"), "shared": ("shared", "size")})
    shares = _layer_counts(layers, size, {"catastrophic": c[:, 3], "selfish": c[:, 4]},
                           {"catastrophic": ("catastrophic", "size"),
                            "selfish": ("selfish", "size")})
    return TaskVectorStats(_ratio(gram, np.outer(norm, norm)), conflicts, shares)


def cosine_matrix(base, finetuned: Sequence) -> np.ndarray:
    """(T, T) float64 cosine similarities of the task vectors theta_t - theta_0 over all leaves
    (each flattened model one vector). A zero task vector has cosine 0 with every vector,
    itself included."""
    return task_vector_stats(base, finetuned).cosine


def sign_conflicts(base, finetuned: Sequence, *, density: float = 0.2) -> LayerCounts:
    """Per layer: entries kept by >= 2 tasks after TIES' top-`density` magnitude trim and the
    share of them whose kept signs disagree (rate "conflict" = conflicts / shared); see
    `task_vector_stats`. Two identical task vectors give 0, a task vector and its negation 1.
    """
    return task_vector_stats(base, finetuned, density=density).conflicts


def tall_shares(base, finetuned: Sequence, *, lam=0.6, merged: str = "sum",
                density: float = 0.2) -> LayerCounts:
    """Per layer, the share of weights TALL masks (lambda_t = `lam`, scalar or per task;
    tau_MTL = `multitask_vector(merged, density)`) give to no task ("catastrophic") and to
    exactly one ("selfish"); see `task_vector_stats`."""
    return task_vector_stats(base, finetuned, mask_lam=lam, merged=merged,
                             mask_density=density).shares


# ------------------------------------------------------------------------------ figures


def heatmap_figure(matrix: np.ndarray, names: Sequence[str], *, title: str, label: str):
    """A (T, T) matrix in [-1, 1] as an annotated heatmap (matplotlib Figure, Agg)."""
    from matplotlib.figure import Figure

    n = len(names)
    side = 2.6 + 0.45 * n
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    if n <= 12:  # numbers stay legible up to a dozen tasks
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(matrix[i, j]) > 0.6 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    return fig


def layer_bars_figure(layers: Sequence[str], series: dict[str, np.ndarray], *, title: str,
                      ylabel: str):
    """Grouped bars, one group per layer and one bar (and legend entry) per series."""
    from matplotlib.figure import Figure

    x = np.arange(len(layers))
    width = 0.8 / max(len(series), 1)
    fig = Figure(figsize=(max(4.5, 1.0 + 0.45 * len(layers)), 3.6), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    for k, (name, values) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, layers, rotation=45 if len(layers) > 4 else 0, ha="right"
                  if len(layers) > 4 else "center", fontsize=8)
    ax.set_xlabel("layer (module, in parameter-tree order)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return fig


# ------------------------------------------------------------------------------ the section


def task_vector_section(base, finetuned: Sequence, task_names: Sequence[str], *,
                        density: float = 0.2, mask_lam=0.6, merged: str = "sum",
                        mask_density: float = 0.2) -> Section:
    """Section "task_vectors": cosines, TIES sign conflicts at `density`, TALL shares with
    `mask_lam` (scalar or per task) against tau_MTL (`merged`, `mask_density`), with a heatmap
    and two per-layer bar charts (`task_vector_cosine`, `ties_sign_conflicts`,
    `tall_mask_shares`)."""
    names, finetuned = list(task_names), list(finetuned)
    if len(names) != len(finetuned):
        raise ValueError(f"task_vector_section: {len(names)} task names for {len(finetuned)} "
                         "fine-tuned models; give one name per model")
    stats = task_vector_stats(base, finetuned, density=density, mask_lam=mask_lam,
                              merged=merged, mask_density=mask_density)
    cos, conflicts, shares = stats.cosine, stats.conflicts, stats.shares
    lams = np.broadcast_to(np.asarray(mask_lam, np.float64), (len(names),)).tolist()
    lam_text = (f"λ = {lams[0]:g}" if len(set(lams)) == 1
                else "λ per task " + ", ".join(f"{v:g}" for v in lams) if len(lams) <= 5
                else f"λ per task in [{min(lams):g}, {max(lams):g}]")
    numbers = {
        "tasks": names,
        "cosine": cos.tolist(),
        "ties": {"density": density, **conflicts.numbers()},
        "tall": {"lam": lams, "merged": merged, **shares.numbers()},
    }
    figures = {
        "task_vector_cosine": heatmap_figure(
            cos, names, title="Cosine similarity of task vectors",
            label="cosine similarity (unitless)"),
        "ties_sign_conflicts": layer_bars_figure(
            conflicts.layers, {"sign conflict": 100 * conflicts.rates["conflict"]},
            title=f"TIES sign conflicts after top-{100 * density:g}% trim",
            ylabel="% of entries kept by ≥ 2 tasks"),
        "tall_mask_shares": layer_bars_figure(
            shares.layers, {"catastrophic (no task)": 100 * shares.rates["catastrophic"],
                            "selfish (one task)": 100 * shares.rates["selfish"]},
            title=f"Weights TALL masks give to no task / one task\n({lam_text})",
            ylabel="% of the layer's weights"),
    }
    off = cos[~np.eye(len(names), dtype=bool)]
    text = (f"Task vectors: mean off-diagonal cosine {off.mean() if off.size else 0.0:.3f}. "
            f"After TIES' top-{100 * density:g}% trim, "
            f"{100 * conflicts.total['conflict']:.1f}% of the entries kept by two or more tasks "
            f"disagree in sign. TALL masks leave {100 * shares.total['catastrophic']:.1f}% of "
            f"the weights to no task (catastrophic) and "
            f"{100 * shares.total['selfish']:.1f}% to exactly one (selfish).")
    return Section("task_vectors", "Task vectors: similarity, sign conflicts, TALL masks",
                   numbers, figures, text)


# ------------------------------------------------------------------------------ a run's sections


def write_run_sections(config, workdir: str | Path, base, finetuned: Sequence, rows: list[dict],
                       sweeps: dict[str, list]) -> list[Path]:
    """Writes a weight-space run's sections into `workdir` as `config.diagnostics` asks;
    returns the PNG paths ([] when off or on failure).

    "task_vectors": `task_vector_section` of the merged trees (`base` and `finetuned`: the
    backbones) with TIES' `merge.ties.density` and the TALL lambdas the tall_masks row chose
    per task (else `merge.tall_masks.lam`); "sweeps": `sweep_section` of `sweeps` (`{entry:
    [(hparams, validation scores)]}`, every candidate the run scored). A failure is logged,
    never raised: the results are already written and the diagnostics only explain them.
    """
    if not report.enabled(config):
        return []
    start = time.perf_counter()
    try:
        sections = []
        if report.enabled(config, "task_vectors"):
            tall = dict(config.merge.get("tall_masks", {}))
            row = next((r for r in rows if str(r["method"]).startswith("tall_masks")
                        and "per_task" in (r.get("hparams") or {})), None)
            lam = ([hp["lam"] for hp in row["hparams"]["per_task"]] if row is not None
                   else tall.get("lam", 0.6))
            sections.append(task_vector_section(
                base, finetuned, [task_name(t) for t in range(len(finetuned))],
                density=config.merge.get("ties", {}).get("density", 0.2), mask_lam=lam,
                merged=tall.get("merged", "sum"), mask_density=tall.get("density", 0.2)))
        if report.enabled(config, "sweeps"):
            per_task = {e: methods.get(parse_method(e, "weight_space").name).per_task_search
                        for e in sweeps}
            section = sweep_section(sweeps, per_task)
            if section is not None:
                sections.append(section)
        paths = report.write_sections(workdir, sections)
        logging.info("weight-space diagnostics: %.1f s", time.perf_counter() - start)
        return paths
    except Exception:  # diagnostics explain a run; they never lose it
        logging.exception("weight-space diagnostics failed")
        return []
