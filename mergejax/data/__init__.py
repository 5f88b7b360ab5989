"""Datasets, tasks (label subsets) and batching."""

from mergejax.data import mnist  # noqa: F401  (registers "mnist5k")
from mergejax.data.batches import eval_batches, image_batches, train_batches
from mergejax.data.datasets import Dataset, load, names, register
from mergejax.data.tasks import Task, select, split_classes, union

__all__ = ["Dataset", "Task", "eval_batches", "image_batches", "load", "names", "register",
           "select", "split_classes", "train_batches", "union"]
