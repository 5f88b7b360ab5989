"""Interpolation curves between two matched models, and their barrier heights (Git Re-Basin).

**The line.** Every alignment is a `(merge M (n, 2n), unmerge U (2n, n))` pair per feature space
(`mergejax.specs.apply_merge`); the naive line is `identity_transforms` (M = [I/2, I/2]). Write
a_r and b_r for the mass row r of M puts on model A's and model B's features (a_r + b_r = 1).
The model at t in [0, 1] is `apply_merge` with M replaced by

    M(t)[r] = alpha_r(t) * M_A[r] / a_r  +  (1 - alpha_r(t)) * M_B[r] / b_r,
    alpha_r(t) = (1 - t) a_r / ((1 - t) a_r + t b_r)

(alpha_r = 1 if b_r = 0, 0 if a_r = 0): each merged feature weighs its A members against its B
members with odds (1 - t) a_r : t b_r, so t = 1/2 is exactly the method's own merge.

- Permutations (permute, weight matching, naive): a_r = b_r = 1/2, so M(t) = [(1 - t) I, t P]
  and the line is Git Re-Basin's theta(t) = (1 - t) theta_A + t pi(theta_B), B permuted into
  A's basis. t = 0 is model A and t = 1 model B (permuted: the same function), exactly.
- ZipIt! / MuDSC (which may merge features within one model): a feature whose members all come
  from one model keeps its weights all along. t = 0 is "model A through the zip": A's weights,
  where features ZipIt! merged within A are averaged and features merged only within B come
  from B; t = 1 likewise for B. Its ends are therefore not the endpoints, and the gap between
  the curve's end and the endpoint is the cost of the within-model merges.

Leaves that produce no merged space (the task heads) follow `apply_merge`'s tails: when all
tasks share one label space they are interpolated with weights (1 - t, t); otherwise every
task keeps its own model's head (unmerged into the line's basis), all on the same trunk.

**Scoring.** With BatchNorm, every point (the ends included) gets its running statistics
recomputed on the given batches by `mergejax.repair.reset_batch_stats` (`stacked=True`), so the
ends equal the endpoints after that same reset (the endpoints themselves under
`config.repair.reset_endpoints`). The K points are stacked and scored by one vmapped, jitted
forward per evaluation batch (and one per reset batch); per-task heads that differ only in the
head are concatenated into one wider head, so K points cost K forward passes whatever the
number of tasks. Metrics at each point are ZipIt!'s (`mergejax.evaluation.accuracies`) plus:

- joint loss: -log of the true class's probability under the heads' uniform mixture
  (mean over heads of each head's softmax, 0 for a head without that class): the NLL whose
  argmax is the joint accuracy's prediction; with one head, the cross-entropy;
- per-task loss: on the task's examples, -log of the true class's probability renormalised
  over the task's classes (the outputs per-task accuracy takes its argmax over).

Losses are in nats. The barrier of a curve f on points t_k is Git Re-Basin's
max_k f(t_k) - ((1 - t_k) f(0) + t_k f(1)) for a loss, and max_k of the linear interpolation
minus f(t_k) for an accuracy (both >= 0; 0 for a convex loss / concave accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mergejax import evaluation, repair, specs
from mergejax.data import Task, eval_batches, union
from mergejax.models import Model, Variables
from mergejax.specs import MergeSpec

Flat = dict[str, np.ndarray]


@dataclasses.dataclass
class Line:
    """K models along an alignment's line, stacked on a leading axis of every leaf.

    Attributes:
      ts: (K,) the points t.
      trunk: leaves shared by every head, `{path: (K, *shape)}`.
      tails: per head, its own leaves `{path: (K, *shape)}` (empty dicts for one shared head).
      tasks: per head, the global class of each output.
    """

    ts: np.ndarray
    trunk: Flat
    tails: list[Flat]
    tasks: list[Task]

    def tree(self, head: int) -> Variables:
        """The stacked variables of head `head`."""
        return specs.unflatten({**self.trunk, **self.tails[head]})

    def point(self, k: int, head: int = 0) -> Variables:
        """The (unstacked) variables of point k with head `head`."""
        return jax.tree.map(lambda v: v[k], self.tree(head))


@dataclasses.dataclass
class Curve:
    """Metrics at the K points of a line (accuracies in [0, 1], losses in nats).

    Attributes:
      ts: (K,); joint_loss, joint_acc, task_avg_acc: (K,);
      per_task_loss, per_task_acc: {task name: (K,)} (names from `evaluation.task_name`).
    """

    ts: np.ndarray
    joint_loss: np.ndarray
    joint_acc: np.ndarray
    task_avg_acc: np.ndarray
    per_task_loss: dict[str, np.ndarray]
    per_task_acc: dict[str, np.ndarray]

    def barriers(self) -> dict:
        """Barrier heights: `{"joint_loss", "joint_acc", "task_avg_acc", "per_task_loss":
        {task: h}, "per_task_acc": {task: h}}` (losses in nats, accuracies in [0, 1])."""
        return {"joint_loss": barrier(self.ts, self.joint_loss),
                "joint_acc": barrier(self.ts, self.joint_acc, higher_is_better=True),
                "task_avg_acc": barrier(self.ts, self.task_avg_acc, higher_is_better=True),
                "per_task_loss": {k: barrier(self.ts, v) for k, v in self.per_task_loss.items()},
                "per_task_acc": {k: barrier(self.ts, v, higher_is_better=True)
                                 for k, v in self.per_task_acc.items()}}

    def numbers(self) -> dict:
        """The curve and its barriers as JSON data."""
        as_list = lambda v: [float(x) for x in v]  # noqa: E731
        return {"joint_loss": as_list(self.joint_loss), "joint_acc": as_list(self.joint_acc),
                "task_avg_acc": as_list(self.task_avg_acc),
                "per_task_loss": {k: as_list(v) for k, v in self.per_task_loss.items()},
                "per_task_acc": {k: as_list(v) for k, v in self.per_task_acc.items()},
                "barrier": self.barriers()}


def barrier(ts: np.ndarray, values: np.ndarray, *, higher_is_better: bool = False) -> float:
    """Git Re-Basin's barrier of `values` (K,) at points `ts` (K,) from 0 to 1: the largest
    excess of a loss over the straight line between its ends (of the straight line over an
    accuracy, `higher_is_better`). 0 for a convex loss."""
    ts, v = np.asarray(ts, np.float64), np.asarray(values, np.float64)
    chord = (1.0 - ts) * v[0] + ts * v[-1]
    gap = chord - v if higher_is_better else v - chord
    return float(max(gap.max(), 0.0))


# ------------------------------------------------------------------------------------- lines
def _alpha(merge: np.ndarray, n: int, ts: np.ndarray) -> np.ndarray:
    """(K, n_out) share alpha_r(t) of model A's members in merged feature r (module docstring).
    """
    merge = np.asarray(merge, np.float64)
    a, b = merge[:, :n].sum(1), merge[:, n:].sum(1)
    if np.any(a < 0) or np.any(b < 0) or np.any(a + b <= 0):
        raise ValueError("interpolation lines need merge matrices with non-negative rows "
                         "(weighted averages of features)")
    t = ts[:, None]
    den = (1.0 - t) * a + t * b
    alpha = np.where(den > 0, (1.0 - t) * a / np.where(den > 0, den, 1.0), 0.0)
    return np.where(b == 0, 1.0, np.where(a == 0, 0.0, alpha))


def _one_sided(merge: np.ndarray, n: int, side: int) -> np.ndarray:
    """Merge whose rows are model `side`'s members renormalised to sum 1 (0 rows if none)."""
    merge = np.asarray(merge, np.float64)
    block = merge[:, side * n:(side + 1) * n]
    mass = block.sum(1, keepdims=True)
    out = np.zeros_like(merge)
    out[:, side * n:(side + 1) * n] = np.where(mass > 0, block / np.where(mass > 0, mass, 1), 0)
    return out.astype(np.float32)


def line(spec: MergeSpec, endpoints: Sequence[Variables], transforms: Mapping[str, tuple],
         ts: Sequence[float], tasks: Sequence[Task]) -> Line:
    """The models along `transforms`' line between two endpoints (module docstring).

    Args:
      spec: the merge spec; every one of its spaces must be in `transforms`.
      endpoints: models A and B.
      transforms: `{space: (merge (n, 2n), unmerge (2n, n))}` of an alignment of B to A.
      ts: the K points t in [0, 1].
      tasks: per endpoint its task; identical tasks share one interpolated head.

    Returns:
      The stacked line. Built from two `apply_merge` calls (A's side and B's side of every
      merged feature) and elementwise blends, so its cost does not grow with K beyond the blend.
    """
    if len(endpoints) != 2 or len(tasks) != 2:
        raise ValueError(f"interpolation lines join two models, got {len(endpoints)} endpoints "
                         f"and {len(tasks)} tasks")
    missing = [s for s in spec.space_names if s not in transforms]
    if missing:
        raise ValueError(f"an interpolation line needs every feature space aligned; missing "
                         f"{missing} (partial zips have no line)")
    ts = np.asarray(ts, np.float64)
    widths = {s.name: s.width for s in spec.spaces}
    sides = [specs.apply_merge(spec, endpoints, {
        s: (_one_sided(m, widths[s], side), u) for s, (m, u) in transforms.items()
        if s in widths}) for side in (0, 1)]
    flats = [[specs.flatten(tree) for tree in side] for side in sides]  # [side][model]
    alphas = {s: _alpha(transforms[s][0], widths[s], ts) for s in widths}
    shared = len({tuple(t) for t in tasks}) == 1
    trunk, tails = {}, [{}, {}]
    for path, axes in spec.leaves.items():
        produced = [a for a in axes if a.produces]
        if len(produced) > 1:
            raise ValueError(f"leaf {path} produces {len(produced)} spaces; interpolation "
                             "lines support one produced axis per leaf")
        if produced:
            a = produced[0]
            shape = [len(ts)] + [1] * np.ndim(flats[0][0][path])
            shape[a.axis + 1] = widths[a.space]
            alpha = alphas[a.space].reshape(shape).astype(np.float32)
            y_a, y_b = flats[0][0][path][None], flats[1][0][path][None]
            trunk[path] = alpha * y_a + (1 - alpha) * y_b
            continue
        # a tail: model i's leaf, unmerged into the merged basis (the same on either side)
        tail_a, tail_b = flats[0][0][path], flats[0][1][path]
        if shared:
            t = ts.reshape((-1,) + (1,) * np.ndim(tail_a)).astype(np.float32)
            trunk[path] = (1 - t) * tail_a[None] + t * tail_b[None]
        else:
            for i, leaf in enumerate((tail_a, tail_b)):
                tails[i][path] = np.broadcast_to(leaf[None], (len(ts), *np.shape(leaf)))
    if shared:
        return Line(ts, trunk, [{}], [tuple(tasks[0])])
    return Line(ts, trunk, tails, [tuple(t) for t in tasks])


# ------------------------------------------------------------------------------------ scoring
@functools.lru_cache(maxsize=8)
def _stacked_apply(model: Model):
    return jax.jit(jax.vmap(model.apply, in_axes=(0, None)))


def stacked_logits(model: Model, stacked: Variables, images: np.ndarray, batch_size: int = 256,
                   chunk: int = 0) -> np.ndarray:
    """(K, N, C) eval-mode logits of K stacked models on `images` (N, H, W, C): one vmapped
    forward per batch of `batch_size` images and `chunk` points (0: all K at once; the last
    chunk is padded to the same size, so there is one compile)."""
    k = len(jax.tree.leaves(stacked)[0])
    chunk = k if chunk <= 0 else min(chunk, k)
    apply = _stacked_apply(model)
    out = []
    for start in range(0, k, chunk):
        idx = np.minimum(np.arange(start, start + chunk), k - 1)
        part = jax.tree.map(lambda v, idx=idx: jnp.asarray(np.asarray(v)[idx]), stacked)
        logits = [np.asarray(apply(part, x))[:, :n] for x, n in eval_batches(images, batch_size)]
        out.append(np.concatenate(logits, axis=1)[:min(chunk, k - start)])
    return np.concatenate(out)


def _fused(model: Model, ln: Line) -> tuple[Model, Variables] | None:
    """One model whose head is every task head side by side, when the heads' trees differ only
    in the head (params/<model.head>/ leaves with classes on the last axis); None otherwise."""
    prefix = f"params/{model.head}/"
    if len(ln.tails) < 2 or not hasattr(model.module, "num_classes"):
        return None
    for tail, task in zip(ln.tails, ln.tasks):
        if any(not p.startswith(prefix) or np.shape(v)[-1] != len(task) for p, v in tail.items()):
            return None
    total = sum(len(t) for t in ln.tasks)
    wide = dataclasses.replace(model, module=model.module.clone(num_classes=total),
                               kwargs={**model.kwargs, "num_classes": total})
    heads = {p: np.concatenate([np.asarray(t[p]) for t in ln.tails], axis=-1)
             for p in ln.tails[0]}
    return wide, specs.unflatten({**ln.trunk, **heads})


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _masked_logsumexp(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis of the entries where `mask` (rows with no entry: -inf)."""
    masked = np.where(mask, x, -np.inf)
    top = masked.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.where(mask, np.exp(masked - top), 0.0).sum(-1)) + top[..., 0]


def losses(head_logits: Sequence[np.ndarray], head_tasks: Sequence[Task], labels: np.ndarray,
           tasks: Sequence[Task]) -> dict:
    """`{"joint_loss", "per_task_loss": {task name: loss}}` in nats (module docstring) from
    per-head logits (N, len(head task)) on examples whose labels are all in `tasks`' union."""
    lp = np.concatenate([_log_softmax(np.asarray(z, np.float64)) for z in head_logits], axis=1)
    classes = np.concatenate([np.asarray(t) for t in head_tasks])
    is_label = classes[None, :] == labels[:, None]  # (N, C): the columns of the true class
    joint = _masked_logsumexp(lp, is_label) - np.log(len(head_tasks))
    per_task = {}
    for i, task in enumerate(tasks):
        rows = np.isin(labels, task)
        in_task = np.isin(classes, task)[None, :]
        log_p = (_masked_logsumexp(lp[rows], is_label[rows] & in_task)
                 - _masked_logsumexp(lp[rows], np.broadcast_to(in_task, lp[rows].shape)))
        per_task[evaluation.task_name(i)] = float(-log_p.mean()) if rows.any() else 0.0
    return {"joint_loss": float(-joint.mean()), "per_task_loss": per_task}


def evaluate_line(model: Model, ln: Line, images: np.ndarray, labels: np.ndarray,
                  tasks: Sequence[Task], *, reset_batches: Sequence[np.ndarray] | None = None,
                  estimator: str = "population", batch_size: int = 256,
                  chunk: int = 0) -> Curve:
    """Loss and accuracy at every point of `ln` on a labelled split (module docstring).

    Args:
      model: the architecture of the endpoints.
      ln: the line (`line`).
      images, labels: (N, H, W, C) and (N,) global labels; examples outside `tasks` are dropped.
      tasks: the tasks scored (names `task_a`, ... in order).
      reset_batches: image batches for the BatchNorm reset at every point (required when the
        model has BatchNorm).
      estimator: the reset's estimator (`repair.reset_batch_stats`).
      batch_size, chunk: evaluation batch size and points per vmapped call (0: all).
    """
    keep = np.isin(labels, union(tasks))
    images, labels = images[keep], np.asarray(labels)[keep]
    if any(p.startswith("batch_stats/") for p in ln.trunk):
        if not reset_batches:
            raise ValueError("the line's models have BatchNorm: give reset_batches")
        stats = repair.reset_batch_stats(model, ln.tree(0), reset_batches, estimator=estimator,
                                         stacked=True)
        flat_stats = specs.flatten({"batch_stats": stats["batch_stats"]})
        ln = dataclasses.replace(ln, trunk={**ln.trunk, **flat_stats})
    fused = _fused(model, ln)
    if fused is not None:
        wide, tree = fused
        logits = stacked_logits(wide, tree, images, batch_size, chunk)
        edges = np.cumsum([0] + [len(t) for t in ln.tasks])
        per_head = [logits[..., lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
    else:
        per_head = [stacked_logits(model, ln.tree(h), images, batch_size, chunk)
                    for h in range(len(ln.tasks))]
    rows = []
    for k in range(len(ln.ts)):
        zs = [z[k] for z in per_head]
        acc = evaluation.accuracies([evaluation.softmax(z) for z in zs], ln.tasks, labels, tasks)
        rows.append({**acc, **losses(zs, ln.tasks, labels, tasks)})
    names = list(rows[0]["per_task_acc"])
    return Curve(
        ts=np.asarray(ln.ts, np.float64),
        joint_loss=np.array([r["joint_loss"] for r in rows]),
        joint_acc=np.array([r["joint_acc"] for r in rows]),
        task_avg_acc=np.array([r["task_avg_acc"] for r in rows]),
        per_task_loss={n: np.array([r["per_task_loss"][n] for r in rows]) for n in names},
        per_task_acc={n: np.array([r["per_task_acc"][n] for r in rows]) for n in names})


def interpolation_curve(model: Model, spec: MergeSpec, endpoints: Sequence[Variables],
                        transforms: Mapping[str, tuple] | None, tasks: Sequence[Task],
                        images: np.ndarray, labels: np.ndarray, *, points: int = 11,
                        reset_batches: Sequence[np.ndarray] | None = None,
                        estimator: str = "population", batch_size: int = 256,
                        chunk: int = 0) -> Curve:
    """The curve of `points` evenly spaced t in [0, 1] along `transforms`' line (None: the
    naive line, `identity_transforms`). See `line` and `evaluate_line` for the arguments."""
    if points < 2:
        raise ValueError(f"an interpolation curve needs at least 2 points, got {points}")
    if transforms is None:
        transforms = specs.identity_transforms(spec, 2)
    ln = line(spec, endpoints, transforms, np.linspace(0.0, 1.0, points), tasks)
    return evaluate_line(model, ln, images, labels, tasks, reset_batches=reset_batches,
                         estimator=estimator, batch_size=batch_size, chunk=chunk)
