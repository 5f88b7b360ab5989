"""Runs one mergejax experiment.

    python launch.py --config=configs/digits_resnet20.py --workdir=/tmp/mergejax
    python launch.py --config=configs/cifar_resnet20.py:width=8 --workdir=W --config.seed=1

On a cluster, run the same command on every host with --distributed (jax.distributed picks up
Slurm / Kubernetes / Cloud TPU settings; elsewhere pass --coordinator, --num_processes and
--process_id, or set MERGEJAX_COORDINATOR, MERGEJAX_NUM_PROCESSES, MERGEJAX_PROCESS_ID). Every
stage is data-parallel over all devices of all processes; process 0 alone writes the workdir.
Two local CPU processes:

    for i in 0 1; do python launch.py --config=configs/digits_mlp.py:quick --workdir=W \
      --distributed --coordinator=localhost:12345 --num_processes=2 --process_id=$i & done; wait

Errors are one line on stderr (what, where, how to fix): exit code 2 for usage errors (bad
flags or config, all problems listed at once), 1 for failures (including methods that failed
while the others finished; their rows carry an `error` field). `--debug` or MERGEJAX_DEBUG=1
shows the traceback.
"""

import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from mergejax.io.cli_errors import UsageError, debug_enabled, exit_code, format_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for endpoints and results.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Run as one of several processes "
                                  "(jax.distributed.initialize()).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of an error (also "
                           "MERGEJAX_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])



class _QuietOrbax:
    """Drops orbax's per-file INFO lines so the run's own progress stays readable."""

    def filter(self, record) -> bool:
        return record.levelno > 20 or "orbax" not in record.pathname


def _debug(argv=None) -> bool:
    return debug_enabled(sys.argv[1:] if argv is None else argv) or bool(
        flags.FLAGS.is_parsed() and _DEBUG.value)


def _exit(error: BaseException, code: int | None = None, argv=None) -> None:
    """One line on stderr (`launch.py: error: ...`), the traceback with --debug, then exit."""
    if code is None:
        code = exit_code(error, usage=(flags.Error, PermissionError))
    print(" ".join(format_error(error, "launch.py").split()), file=sys.stderr, flush=True)
    if _debug(argv):
        traceback.print_exception(error)
    sys.exit(code)


def _one_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split()) or type(error).__name__


def _config_problem(error: BaseException, argv) -> str:
    """What went wrong with --config / --config.<field>, as one line."""
    text = _one_line(error)
    if "Traceback" in str(error):  # ml_collections embeds the config file's traceback
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        text = f"{lines[0].split(':')[0]}: {lines[-1]}"
    quoted = re.fullmatch(r"""["']*([\w.]+)["']*""", text)
    if isinstance(error, KeyError) or quoted:
        key = quoted.group(1) if quoted else str(error.args[0]) if error.args else ""
        given = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
        where = given[0].split("=")[0] if given else "--config"
        return (f"{where}: the config has no field {key!r}; see the config file for the "
                "fields it defines")
    return text


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag or config file as one line and exit code 2."""
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                _exit(UsageError(f"--config: config file {path} does not exist"), argv=argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit(UsageError(_config_problem(e, argv)) if "config" in str(e)[:60]
              or re.fullmatch(r"""["']*[\w.]+["']*""", str(e)) else e, argv=argv)
    except Exception as e:  # the config file itself failed (missing, bad :args, syntax)
        _exit(UsageError(_config_problem(e, argv)), argv=argv)


def main(argv):
    if len(argv) > 1:
        _exit(UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag"))
    import logging as py_logging

    for handler in py_logging.getLogger().handlers + py_logging.getLogger("absl").handlers:
        handler.addFilter(_QuietOrbax())
    try:
        import jax

        from mergejax.io import compile_cache

        cache = compile_cache.enable()  # before any compile; MERGEJAX_COMPILE_CACHE=off disables
        logging.info("compilation cache: %s", cache or "off")
        if _DISTRIBUTED.value:
            from mergejax import distributed

            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(),
                     jax.devices())
        logging.info("config file: %s", config_flags.get_config_filename(flags.FLAGS["config"]))
        logging.info("overrides: %s", config_flags.get_override_values(flags.FLAGS["config"]))
        from mergejax import experiment

        rows = experiment.run(_CONFIG.value, _WORKDIR.value)
    except KeyboardInterrupt:
        print("launch.py: interrupted; finished rows are in results.json", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        _exit(e)
    bad = experiment.failed(rows)
    if bad:
        details = "; ".join(f"{r['method']} ({r['error']})" for r in bad)
        print(f"launch.py: error: {len(bad)} of {len(rows)} rows failed: {details}; the other "
              f"rows are in {os.path.join(_WORKDIR.value, 'results.json')}", file=sys.stderr,
              flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
