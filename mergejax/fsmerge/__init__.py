"""FS-Merge (Kinderman et al., "Foldable SuperNets", TMLR 2025) and the distillation baseline.

The SuperNet keeps the N endpoints' weights frozen and learns, per layer, a merge matrix M on
its output channels and an unmerge matrix U on its input channels; it folds in closed form into
a plain model of the merged width (`fold`), which is how it is run during the fit too. Modules:
`plan` (each leaf's role), `params` (initialisations and parameterisations of M and U), `fold`,
`objective` (global / local feature reconstruction), `fit` (the optax loop, shared with
`distill`, data-parallel over the `data` mesh axis), `features`, `data`, `widths` (the merged
model at another width), `merge` (setup, fit, fold end to end).

Layer: below `mergejax.methods` (which registers `fs_merge` and `distill`), above specs.
"""

from mergejax.fsmerge.distill import distill
from mergejax.fsmerge.fit import FitSettings, fit_loop, mean_loss, plot_loss
from mergejax.fsmerge.fold import fold, matrices
from mergejax.fsmerge.merge import Setup, fit_setup, fold_setup, setup
from mergejax.fsmerge.objective import OBJECTIVES
from mergejax.fsmerge.params import INITS, PARAMETERISATIONS, init_transform
from mergejax.fsmerge.widths import resize

__all__ = ["INITS", "OBJECTIVES", "PARAMETERISATIONS", "FitSettings", "Setup", "distill",
           "fit_loop", "fit_setup", "fold", "fold_setup", "init_transform", "matrices", "mean_loss",
           "plot_loss", "resize", "setup"]
