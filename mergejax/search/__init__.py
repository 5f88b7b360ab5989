"""Recipe search: AutoMerge-style per-block choice of merge method and hyperparameters.

- `blocks`: which tensors share one recipe (module-name rules or regex groups);
- `space`: the per-block method / weight / density / lambda space and its recipe documents;
- `objective`: per-task validation scores to one number (AutoMerge's dynamic weighting,
  mean, worst);
- `study`: optuna samplers (TPE, CMA-ES, random), resumable SQLite storage, trials.csv and the
  best-so-far plot;
- `run`: the launcher's `search` kind (`config.kind = "search"`).

Import `mergejax.search.run` only where the launcher needs it: it pulls in the run layer.
"""

from mergejax.search.blocks import default_blocks, model_blocks, regex_blocks
from mergejax.search.objective import OBJECTIVES, objective
from mergejax.search.space import DEFAULT_METHODS, NumpyTrial, SearchSpace, selectors
from mergejax.search.study import (
    SAMPLERS,
    SearchResult,
    Trial,
    plot_best_so_far,
    run_search,
    trials_csv,
)

__all__ = [
    "DEFAULT_METHODS", "OBJECTIVES", "SAMPLERS", "NumpyTrial", "SearchResult", "SearchSpace",
    "Trial",
    "default_blocks", "model_blocks", "objective", "plot_best_so_far", "regex_blocks",
    "run_search", "selectors", "trials_csv",
]
