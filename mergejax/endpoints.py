"""Endpoints: one trained model per task, saved with orbax and reused when present.

An endpoint's directory name is a hash of everything that determines its weights (dataset,
task classes, model and its kwargs, training settings, seed), so changing any of them trains a
new endpoint while a second identical run skips training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from mergejax import checkpointing, train
from mergejax.data import Dataset, Task, select
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
    if checkpointing.exists(path):
        logging.info("reusing endpoint %s from %s", name, path)
        like = model.init_shapes(x[:1])
        return checkpointing.load(path, like=like)
    logging.info("training endpoint %s on classes %s (%d examples)", name, task, len(y))
    variables, losses = train.train(model, x, y, settings, seed=seed, augment=dataset.augment,
                                    desc=f"train {name}", variables=init)
    meta = {"model": model.name, "model_kwargs": model.kwargs, "task": list(task),
            "dataset": dataset.name, "seed": seed, "train": dataclasses.asdict(settings),
            "key": key, "parent": parent,
            "final_loss": losses[-1] if losses else None}
    checkpointing.save(path, variables, meta)
    return variables  # train() returns numpy leaves

