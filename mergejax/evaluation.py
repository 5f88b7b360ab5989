"""Evaluation exactly as ZipIt! defines it: joint, per-task and task-average accuracy.

A model under evaluation is a list of *heads*: `(variables, task)` pairs, where `task` lists the
global class id of each output of that head. An endpoint is one head; an ensemble or a merged
model with per-task heads (or per-model tails after partial zipping) is several.

- joint: softmax per head, concatenate all heads' probabilities, argmax over the union of
  classes, on every test example of any task;
- per task t: on t's examples, argmax over the head outputs that belong to t's classes (0 when
  no head covers t);
- task average: the mean of the per-task accuracies.

Forward passes are data-parallel: each batch is sharded over the `data` axis of the run's mesh
(`mergejax.distributed`), the variables replicated, the logits gathered (replicated) for the
host-side metrics; padded rows are dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from mergejax import distributed
from mergejax.data import Task, eval_batches, union
from mergejax.models import Model, Variables

Head = tuple[Variables, Task]


@functools.lru_cache(maxsize=32)
def _apply_fn(model: Model, mesh: jax.sharding.Mesh):
    return jax.jit(model.apply, out_shardings=distributed.replicated_sharding(mesh))


def logits(model: Model, variables: Variables, images: np.ndarray, batch_size: int = 256,
           mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Eval-mode logits (N, C) of `images` (N, H, W, C), in fixed-size batches sharded over
    the `data` axis of `mesh` (default: the run's mesh)."""
    mesh = distributed.mesh() if mesh is None else mesh
    apply = _apply_fn(model, mesh)
    variables = distributed.replicate(variables, mesh)
    out = []
    for x, n in eval_batches(images, batch_size):
        xs, _ = distributed.put_batch(x, mesh)  # padded rows are cut off below
        # `wait` blocks only when the mesh spans several local CPU devices (a no-op check
        # otherwise): there, a host running ahead of XLA:CPU can starve a running all-gather.
        out.append(distributed.to_host(distributed.wait(apply(variables, xs), mesh))[:n])
    return np.concatenate(out)


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (shifted by the max: no overflow)."""
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def accuracies(head_probs: Sequence[np.ndarray], head_tasks: Sequence[Task],
               labels: np.ndarray, tasks: Sequence[Task]) -> dict:
    """ZipIt! metrics from per-head probabilities.

    Args:
      head_probs: per head, (N, len(task)) softmax probabilities on all N examples.
      head_tasks: per head, the global class of each output.
      labels: (N,) global labels.
      tasks: the tasks to score.

    Returns:
      `{"joint_acc", "task_avg_acc", "per_task_acc": {task_name: acc}}`, accuracies in [0, 1].
    """
    probs = np.concatenate(head_probs, axis=1)
    classes = np.concatenate([np.asarray(t) for t in head_tasks])
    in_any = np.isin(labels, union(tasks))
    joint = float(np.mean(classes[probs[in_any].argmax(1)] == labels[in_any]))
    per_task = {}
    for i, task in enumerate(tasks):
        rows = np.isin(labels, task)
        cols = np.isin(classes, task)
        if not cols.any():
            per_task[task_name(i)] = 0.0
            continue
        pred = classes[cols][probs[np.ix_(rows, cols)].argmax(1)]
        per_task[task_name(i)] = float(np.mean(pred == labels[rows]))
    return {"joint_acc": joint, "task_avg_acc": float(np.mean(list(per_task.values()))),
            "per_task_acc": per_task}


def task_name(i: int) -> str:
    """The name of the i-th task in results ("task_a", "task_b", ...)."""
    return f"task_{chr(ord('a') + i)}" if i < 26 else f"task_{i}"


def evaluate(model: Model, heads: Sequence[Head], images: np.ndarray, labels: np.ndarray,
             tasks: Sequence[Task], batch_size: int = 256) -> dict:
    """Joint / per-task / task-average accuracy of a (multi-head) model on a labelled split."""
    return evaluate_heads([(model, v, t) for v, t in heads], images, labels, tasks, batch_size)


def joint_predictions(model: Model, heads: Sequence[Head], images: np.ndarray,
                      batch_size: int = 256) -> np.ndarray:
    """(N,) global class predicted for each image: the argmax of every head's softmax
    probabilities side by side (the prediction that joint accuracy scores)."""
    probs = np.concatenate([softmax(logits(model, v, images, batch_size)) for v, _ in heads],
                           axis=1)
    classes = np.concatenate([np.asarray(t) for _, t in heads])
    return classes[probs.argmax(1)]


def evaluate_heads(heads: Sequence[tuple[Model, Variables, Task]], images: np.ndarray,
                   labels: np.ndarray, tasks: Sequence[Task], batch_size: int = 256) -> dict:
    """As `evaluate`, for heads that are different models (per-task heads of different sizes)."""
    keep = np.isin(labels, union(tasks))
    images, labels = images[keep], labels[keep]
    probs = [softmax(logits(m, v, images, batch_size)) for m, v, _ in heads]
    return accuracies(probs, [t for _, _, t in heads], labels, tasks)
