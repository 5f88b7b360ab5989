"""Endpoints: one trained model per task, saved with orbax and reused when present.

An endpoint's directory name is a hash of everything that determines its weights (dataset,
task classes, model and its kwargs, training settings, seed), so changing any of them trains a
new endpoint while a second identical run skips training. A cached endpoint that cannot be
read (truncated or garbled files) is named in a warning, moved aside to
`endpoints/<name>.corrupt-<time>` and retrained.

Several processes (`launch.py --distributed`): process 0 alone reads and writes the cache. It
decides whether a usable endpoint is cached and broadcasts the decision; a cached endpoint is
broadcast to every process, otherwise all processes train the one model together
(data-parallel, `train.train`) and process 0 saves it. So an endpoint is trained once per run,
not once per process, and no process needs to see the writer's disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from mergejax import distributed, train
from mergejax.data import Dataset, Task, select
from mergejax.io import checkpoint as checkpointing
from mergejax.models import Model, Variables


def endpoint_key(dataset: str, task: Task, model: Model, settings: train.TrainSettings,
                 seed: int, parent: str | None = None) -> str:
    """A short stable id of an endpoint's training recipe (`parent`: the key it starts from)."""
    recipe = {"dataset": dataset, "task": list(task), "model": model.name,
              "model_kwargs": model.kwargs, "train": dataclasses.asdict(settings), "seed": seed,
              "parent": parent}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    return f"{model.name}-{dataset}-{'_'.join(map(str, task))}-s{seed}-{digest[:10]}"


def get_or_train(workdir: str | Path, dataset: Dataset, task: Task, model: Model,
                 settings: train.TrainSettings, seed: int, name: str,
                 init: Variables | None = None, parent: str | None = None) -> Variables:
    """The endpoint for `task` from `workdir/endpoints/`, training and saving it if absent.

    `init` starts training from given variables (fine-tuning); `parent` names them in the key.
    """
    key = endpoint_key(dataset.name, task, model, settings, seed, parent)
    path = Path(workdir) / "endpoints" / key
    x, y = select(*dataset.splits["train"], task)
    cached = _read_cache(path, name, model, x[:1]) if distributed.is_writer() else None
    if distributed.process_count() > 1:  # every process follows process 0's cache
        found = bool(distributed.broadcast(np.asarray(cached is not None)))
        if found:
            like = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), model.init_shapes(x[:1]))
            return distributed.broadcast(cached if cached is not None else like)
    elif cached is not None:
        return cached
    logging.info("training endpoint %s on classes %s (%d examples)", name, task, len(y))
    variables, losses = train.train(model, x, y, settings, seed=seed, augment=dataset.augment,
                                    desc=f"train {name}", variables=init)
    meta = {"model": model.name, "model_kwargs": model.kwargs, "task": list(task),
            "dataset": dataset.name, "seed": seed, "train": dataclasses.asdict(settings),
            "key": key, "parent": parent,
            "final_loss": losses[-1] if losses else None}
    if distributed.is_writer():
        checkpointing.save(path, variables, meta)
    return variables  # train() returns numpy leaves


def _read_cache(path: Path, name: str, model: Model, example) -> Variables | None:
    """The endpoint cached at `path`, or None (an unreadable one is moved aside)."""
    if checkpointing.exists(path):
        logging.info("reusing endpoint %s from %s", name, path)
        try:
            return checkpointing.load(path, like=model.init_shapes(example))
        except Exception as e:  # truncated / garbled orbax files, wrong shapes
            _move_aside(path, name, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                        if str(e) else type(e).__name__)
    elif path.exists():  # not a complete checkpoint (e.g. its meta.json was removed)
        _move_aside(path, name, "incomplete checkpoint (no meta.json or state/)")
    return None


def _move_aside(path: Path, name: str, why: str) -> Path:
    """Renames an unreadable cached endpoint to `<path>.corrupt-<time>` with a warning."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, aside)
    message = (f"cached endpoint {name} at {path} is corrupt ({why}); moved it aside to "
               f"{aside} and retraining")
    logging.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    return aside
