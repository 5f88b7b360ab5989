"""What every run kind sets up the same way: workdir, model, training settings, tasks, batches.

Shared by `mergejax.multitask` and `mergejax.finetune`, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from mergejax import data as data_lib
from mergejax import models, train
from mergejax.data import Dataset, Task
from mergejax.io.atomic import temp_sibling


def check_workdir(workdir: str | os.PathLike) -> Path:
    """Creates `workdir` and checks it is writable before any work starts."""
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"workdir {path} is not writable: {e}") from None
    return path


LOCK = ".lock"


class WorkdirLocked(RuntimeError):
    """Another live launcher holds the workdir's lock file."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Holds `workdir/.lock` (`{"pid", "host", "started"}`) for the block.

    A lock whose owner is dead (same host, PID gone) is stale and taken over; a live owner
    raises `WorkdirLocked` naming its PID and host. The lock is removed on exit.
    """
    path = Path(workdir) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = temp_sibling(path)  # a name `remove_stale_temporaries` cleans if we are killed
    for _ in range(3):
        try:
            tmp.write_text(json.dumps(me))  # complete before it appears under the lock's name
            os.link(tmp, path)  # atomic; fails if the lock exists
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if not isinstance(pid, int) or (host == me["host"] and not _alive(pid)):
                path.unlink(missing_ok=True)  # stale: its owner died (killed run)
                continue
            tmp.unlink(missing_ok=True)
            raise WorkdirLocked(
                f"workdir {workdir} is in use by another run (PID {pid} on host {host}, "
                f"started {owner.get('started', '?')}); wait for it, use another --workdir, "
                f"or delete {path} if that process is gone") from None
        break
    else:
        tmp.unlink(missing_ok=True)
        raise WorkdirLocked(f"could not take the lock {path}; delete it if no run is using "
                            f"{workdir}")
    tmp.unlink(missing_ok=True)
    try:
        yield path
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass


def model_from_config(config, num_classes: int) -> models.Model:
    """`models.create(config.model.name, **other fields, num_classes=...)`."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return models.create(config.model.name, num_classes=num_classes, **kwargs)


def repair_settings(config) -> tuple[str, bool]:
    """(BatchNorm reset estimator, reset the endpoints first?) from `config.repair`."""
    settings = config.get("repair", {})
    return settings.get("estimator", "population"), bool(settings.get("reset_endpoints", False))


def train_settings(config) -> train.TrainSettings:
    """The training fields of the config as TrainSettings."""
    fields = {f.name for f in dataclasses.fields(train.TrainSettings)}
    return train.TrainSettings(**{k: v for k, v in config.train.items() if k in fields})


def tasks_from_config(config, num_classes: int) -> list[Task]:
    """`config.data.task_classes` when given (checked against the dataset), else a seeded
    split of the classes into `config.data.num_tasks` tasks (`data.split_classes`)."""
    given = tuple(config.data.get("task_classes", ()) or ())
    if not given:
        return data_lib.split_classes(
            num_classes, config.data.num_tasks, seed=config.seed, kind=config.data.task_kind,
            classes_per_task=config.data.classes_per_task or None)
    tasks = []
    for i, task in enumerate(given):
        task = tuple(int(c) for c in task)
        bad = [c for c in task if not 0 <= c < num_classes]
        if not task or bad or len(set(task)) != len(task):
            raise ValueError(f"config.data.task_classes[{i}] = {task}: a task is a non-empty "
                             f"tuple of distinct class ids in [0, {num_classes})")
        tasks.append(task)
    return tasks


def load_tasks(config) -> tuple[Dataset, list[Task]]:
    """The dataset of `config.data` and the tasks cut from it."""
    dataset = data_lib.load(config.data.name, config.data.data_dir or None)
    return dataset, tasks_from_config(config, dataset.num_classes)


def stratified_choice(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `n` of the `labels` (N,), each class getting its share of `n` in
    proportion to its count (largest remainders first, ties to the smaller class id); all N
    indices when n <= 0 or n >= N."""
    labels = np.asarray(labels)
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / len(labels)
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[:n - take.sum()]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def task_images(dataset: Dataset, tasks: Sequence[Task], per_task: int, seed: int
                ) -> list[np.ndarray]:
    """Per task, its training images (n_i, H, W, C): all of them when `per_task` is 0, else a
    class-stratified subset of `per_task` drawn with seed `seed + i` for task i."""
    train_x, train_y = dataset.splits["train"]
    out = []
    for i, task in enumerate(tasks):
        x, y = data_lib.select(train_x, train_y, task)
        out.append(x[stratified_choice(y, int(per_task), np.random.default_rng(seed + i))])
    return out


def budget_images(config, dataset: Dataset, tasks: Sequence[Task]) -> list[np.ndarray]:
    """Per task, the training images a merge may read: `config.data.images_per_task` of them
    (a class-stratified subset, seeded by `config.seed`; 0 = all), the same for every method."""
    return task_images(dataset, tasks, config.data.get("images_per_task", 0), config.seed + 3000)


def merge_images(config, dataset: Dataset, tasks: list[Task]) -> np.ndarray:
    """Training images of the tasks' classes, the data for statistics and repair: in dataset
    order when `config.data.shuffle_statistics` is False, else task after task; with an image
    budget (`config.data.images_per_task` > 0) the budget's images, task after task."""
    if config.data.get("images_per_task", 0):
        return np.concatenate(budget_images(config, dataset, tasks))
    train_x, train_y = dataset.splits["train"]
    if not config.data.get("shuffle_statistics", True):
        return train_x[np.isin(train_y, data_lib.union(tasks))]
    return np.concatenate([data_lib.select(train_x, train_y, t)[0] for t in tasks])


def statistics_and_repair_batches(config, images: np.ndarray
                                  ) -> tuple[Callable[[], Iterator], Callable[[], Iterator]]:
    """(statistics batches, repair batches), each a function giving the same batches per call.

    Shuffled (seeds `config.seed` and `config.seed + 1`, full batches only) by default; with
    `config.data.shuffle_statistics=False` both are the images in order with the last partial
    batch kept, as a torch DataLoader without shuffling gives them. `data.stat_batches` and
    `merge.repair_batches` cap the number of batches (0: all).
    """
    size, shuffle = config.data.batch_size, bool(config.data.get("shuffle_statistics", True))
    common = dict(shuffle=shuffle, keep_last=not shuffle)
    return (data_lib.image_batches(images, size, config.data.stat_batches, seed=config.seed,
                                   **common),
            data_lib.image_batches(images, size, config.merge.repair_batches,
                                   seed=config.seed + 1, **common))

