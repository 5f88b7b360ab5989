"""Running a recipe search with optuna: samplers, resumable SQLite storage, trials.csv, plots.

`run_search(space, score_point, ...)` asks the sampler for a point, scores it on validation
data (`score_point(point) -> per-task scores`; the caller's function never sees the test split),
and records every trial in an optuna study stored in SQLite, so a killed search continues from
its stored trials. Each trial's sampler is seeded with `seed + number of finished trials`, and a
trial left RUNNING by a killed process is taken up again under its number with the values it
had drawn: a resumed search proposes exactly the points an uninterrupted one does.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergejax.io.atomic import atomic_write_bytes
from mergejax.registry import Registry
from mergejax.search.objective import objective as objective_fn
from mergejax.search.space import SearchSpace

SAMPLERS: Registry[Callable[[int], Any]] = Registry("search sampler")


@SAMPLERS.decorator("tpe")
def _tpe(seed: int):
    import optuna

    with warnings.catch_warnings():  # multivariate/group are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True,
                                          group=True)


@SAMPLERS.decorator("cmaes")
def _cmaes(seed: int):
    import optuna

    # categorical methods are sampled by the independent (random) sampler, as optuna does
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


@SAMPLERS.decorator("random")
def _random(seed: int):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One finished trial: its point, per-task validation scores and objective value."""

    number: int
    point: Mapping[str, Any]
    scores: Sequence[float]
    value: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Every finished trial in order, and the best (highest value; earliest on ties)."""

    trials: Sequence[Trial]

    @property
    def best(self) -> Trial:
        return max(self.trials, key=lambda t: (t.value, -t.number))


def _point_from(space: SearchSpace, params: Mapping[str, Any]):
    """The full point of stored trial params (fixed values filled in by `space.sample`)."""

    class Replay:  # answers suggest_* from the stored params
        def suggest_float(self, name, lo, hi):
            return params[name]

        def suggest_categorical(self, name, choices):
            return params[name]

    return space.sample(Replay())


def run_search(space: SearchSpace, score_point: Callable[[Mapping[str, Any]], Sequence[float]],
               *, trials: int, storage: str | Path, sampler: str = "tpe", seed: int = 0,
               objective: str = "dynamic", study_name: str = "search",
               on_trial: Callable[[SearchResult], None] | None = None,
               population: int = 1,
               score_points: Callable[[list], list[Sequence[float]]] | None = None,
               progress: bool = True) -> SearchResult:
    """Runs (or resumes) a search until `trials` trials have finished.

    Args:
      space: what is searched.
      score_point: `point -> per-task validation scores` (fractions or percents; higher better).
      trials: total number of finished trials wanted (stored ones count).
      storage: the SQLite file holding the study (created if absent, resumed if present).
      sampler: "tpe" | "cmaes" | "random".
      objective: "dynamic" (AutoMerge) | "mean" | "worst" (`mergejax.search.objective`).
      on_trial: called with every trial finished so far after each population (files).
      population: points asked from the sampler before any is scored (CMA-ES generations,
        random, batched TPE); with `score_points` they are scored together.
      score_points: `[points] -> [per-task scores]`, the batched `score_point`.
    Returns every finished trial.
    """
    import optuna
    from optuna.trial import TrialState

    make_sampler = SAMPLERS.get(sampler)
    combine = objective_fn(objective)
    if score_points is None:
        score_points = lambda points: [score_point(p) for p in points]  # noqa: E731
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=f"sqlite:///{Path(storage)}",
                                direction="maximize", load_if_exists=True)
    # a trial left RUNNING by a killed process is taken up again under its own number (its
    # stored values are reused): samplers seed from the trial number (CMA-ES does)
    interrupted = [t._trial_id for t in study.get_trials(  # noqa: SLF001
        deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))]
    done: list[Trial] = [_stored(space, t, i) for i, t in enumerate(study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)))]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=trials, initial=len(done), desc="search", unit="trial")
    while len(done) < trials:
        study.sampler = make_sampler(seed + len(done))
        asked, points = [], []
        for _ in range(min(max(1, population), trials - len(done))):
            trial = (optuna.trial.Trial(study, interrupted.pop(0)) if interrupted
                     else study.ask())
            asked.append(trial)
            points.append(space.sample(trial))
        start = time.perf_counter()
        all_scores = score_points(points)
        seconds = (time.perf_counter() - start) / len(points)  # per trial
        for trial, point, scores in zip(asked, points, all_scores):
            scores = [float(x) for x in scores]
            value = combine(scores)
            trial.set_user_attr("scores", scores)
            trial.set_user_attr("seconds", seconds)
            study.tell(trial, value)
            done.append(Trial(len(done), point, scores, value, seconds))
        if bar is not None:
            bar.update(len(points))
            bar.set_postfix(best=f"{SearchResult(done).best.value:.4f}")
        if on_trial is not None:
            on_trial(SearchResult(list(done)))
    if bar is not None:
        bar.close()
    best = SearchResult(done).best
    logging.info("search: %d trials, best %.4f (trial %d)", len(done), best.value, best.number)
    return SearchResult(done[:trials])


def _stored(space: SearchSpace, t, number: int) -> Trial:
    """A finished trial read back from the study, numbered by its order among finished ones
    (failed attempts of killed processes are not counted)."""
    return Trial(number, _point_from(space, t.params), list(t.user_attrs["scores"]), float(t.value),
                 float(t.user_attrs.get("seconds", 0.0)))


def trials_csv(result: SearchResult, task_names: Sequence[str]) -> bytes:
    """trials.csv: trial, value, best so far, seconds, one column per task score and per point
    parameter."""
    rows = io.StringIO()
    keys = sorted({k for t in result.trials for k in t.point})
    w = csv.writer(rows)
    w.writerow(["trial", "value", "best_so_far", "seconds", *task_names, *keys])
    best = float("-inf")
    for i, t in enumerate(result.trials):
        best = max(best, t.value)
        w.writerow([i, f"{t.value:.6f}", f"{best:.6f}", f"{t.seconds:.3f}",
                    *(f"{s:.6f}" for s in t.scores), *(t.point.get(k, "") for k in keys)])
    return rows.getvalue().encode()


def plot_best_so_far(result: SearchResult, path: str | Path, title: str = "recipe search"
                     ) -> None:
    """A PNG of every trial's objective and the best so far against the trial number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [t.value for t in result.trials]
    best = [max(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(range(len(values)), values, ".", color="0.6", label="trial")
    ax.plot(range(len(values)), best, "-", color="C0", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective on validation (higher is better)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
