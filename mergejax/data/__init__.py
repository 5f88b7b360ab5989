"""Datasets, tasks (label subsets) and batching."""

from mergejax.data.batches import eval_batches, image_batches, train_batches
from mergejax.data.datasets import Dataset, load, names
from mergejax.data.tasks import Task, select, split_classes, union

__all__ = ["Dataset", "Task", "eval_batches", "image_batches", "load", "names", "select",
           "split_classes", "train_batches", "union"]
