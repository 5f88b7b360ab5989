"""Runs one mergejax experiment.

    python launch.py --config=configs/digits_resnet20.py --workdir=/tmp/mergejax
    python launch.py --config=configs/cifar_resnet20.py:width=8 --workdir=W --config.seed=1

On a cluster, run the same command on every host with --distributed (jax.distributed picks up
Slurm / Kubernetes / Cloud TPU settings; elsewhere pass --coordinator, --num_processes and
--process_id).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for endpoints and results.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax:
    """Drops orbax's per-file INFO lines so the run's own progress stays readable."""

    def filter(self, record) -> bool:
        return record.levelno > 20 or "orbax" not in record.pathname


def main(argv):
    del argv
    import logging as py_logging

    for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
        handler.addFilter(_QuietOrbax())
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    logging.info("config file: %s", config_flags.get_config_filename(flags.FLAGS["config"]))
    logging.info("overrides: %s", config_flags.get_override_values(flags.FLAGS["config"]))
    from mergejax import experiment

    experiment.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
