"""Tasks as label subsets of a dataset, the way ZipIt! splits CIFAR.

A task is a tuple of global class ids. A task's model has one output per class of the task, in
the order of the tuple, so local label k means global class `task[k]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Task = tuple[int, ...]


def split_classes(num_classes: int, num_tasks: int, *, seed: int = 0, kind: str = "disjoint",
                  classes_per_task: int | None = None) -> list[Task]:
    """Splits `num_classes` into `num_tasks` tasks.

    Args:
      kind: `"disjoint"`: a seeded permutation of the classes cut into equal contiguous chunks
        (ZipIt!'s CIFAR-50+50 / 5+5); `"same"`: every task has all classes (same-task merges).
      classes_per_task: with `"disjoint"`, the size of each task (default: all classes shared out).

    Returns:
      One sorted tuple of class ids per task.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if kind == "same":
        return [tuple(range(num_classes))] * num_tasks
    if kind != "disjoint":
        raise ValueError(f"unknown task kind {kind!r}; valid: disjoint, same")
    size = classes_per_task or num_classes // num_tasks
    if size < 1 or size * num_tasks > num_classes:
        raise ValueError(f"cannot cut {num_classes} classes into {num_tasks} disjoint tasks "
                         f"of {size}")
    perm = np.random.default_rng(seed).permutation(num_classes)
    return [tuple(sorted(int(c) for c in perm[i * size:(i + 1) * size]))
            for i in range(num_tasks)]


def select(images: np.ndarray, labels: np.ndarray, task: Sequence[int]
           ) -> tuple[np.ndarray, np.ndarray]:
    """The examples of `task`'s classes, with labels mapped to local ids 0..len(task)-1."""
    lookup = np.full(max(int(labels.max()), max(task)) + 1, -1, np.int32)
    lookup[list(task)] = np.arange(len(task), dtype=np.int32)
    keep = np.isin(labels, task)
    return images[keep], lookup[labels[keep]]


def union(tasks: Sequence[Task]) -> Task:
    """All classes of all tasks, sorted."""
    return tuple(sorted(set().union(*map(set, tasks))))
