"""One line per user error: the shared wrapper of every command line (converters, recipe,
launch.py).

    def main(argv=None) -> int:
        return run_cli(_main, argv, prog="python -m mergejax.converters")

`run_cli` runs `_main(argv)` and maps what it raises to one message on stderr and an exit code:

- `UsageError` (bad arguments, a bad recipe, a refused output path; `ArgumentParser` below
  raises it instead of printing argparse's two-line usage) and any type listed in `usage`:
  exit 2 (`EXIT_USAGE`);
- any other exception (I/O errors, conversion errors, broken checkpoints): exit 1
  (`EXIT_FAILURE`); unexpected types are labelled as internal errors;
- KeyboardInterrupt: exit 130.

No traceback is printed unless `--debug` is among the arguments or the environment variable
`MERGEJAX_DEBUG` is set to 1 (then the full traceback follows the message).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

__all__ = ["ArgumentParser", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE",
           "OutputExistsError", "UsageError", "debug_enabled", "exit_code", "format_error",
           "run_cli"]

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DEBUG_ENV = "MERGEJAX_DEBUG"
DEBUG_FLAG = "--debug"

# Exceptions whose message is written for the user: printed as is. Anything else is a bug or an
# unexpected library error: printed with its type and a hint to rerun with --debug.
_USER_FAILURES = (ValueError, OSError, KeyError, ImportError, RuntimeError)


class UsageError(ValueError):
    """The user asked for something that cannot be done as asked (exit 2): bad arguments, a bad
    recipe or config, an output path that would overwrite or delete something."""


class OutputExistsError(UsageError):
    """An output path that exists and is not empty (pass --overwrite), or that overlaps an
    input."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises UsageError (one line, exit 2 via `run_cli`)
    instead of printing the usage block and exiting itself."""

    def error(self, message: str):  # noqa: D102  (argparse API)
        raise UsageError(f"{message} (see {self.prog} --help)")


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    """True if `--debug` is in `argv` (default sys.argv) or MERGEJAX_DEBUG is 1/true/yes."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return env or DEBUG_FLAG in argv


def format_error(exc: BaseException, prog: str | None = None) -> str:
    """The message printed for `exc`: `<prog>: error: <message>`; for exceptions not written
    for users, their type and a pointer to --debug."""
    head = f"{prog}: error: " if prog else "error: "
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if not isinstance(exc, _USER_FAILURES + (UsageError,)):
        text = (f"internal error {type(exc).__name__}: {text} (rerun with {DEBUG_FLAG} or "
                f"{DEBUG_ENV}=1 for the traceback, and please report it)")
    elif not text:
        text = type(exc).__name__
    return head + text.strip()


def exit_code(exc: BaseException, usage: tuple[type[BaseException], ...] = ()) -> int:
    """2 for usage errors (UsageError and the types in `usage`), 130 for an interrupt, else 1."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_USAGE if isinstance(exc, (UsageError, *usage)) else EXIT_FAILURE


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
            prog: str | None = None, usage: tuple[type[BaseException], ...] = (),
            debug: bool | None = None) -> int:
    """Runs `main(argv)` and returns its exit status (0 for None); exceptions become one
    message on stderr and exit 2 (usage) or 1 (failure), see the module docstring.

    Args:
      main: the command, taking the argument list (without the program name).
      argv: the arguments (default sys.argv[1:]).
      prog: printed before the message (`<prog>: error: ...`).
      usage: extra exception types that are usage errors (exit 2), e.g. a RecipeError.
      debug: force the traceback on/off (default: `debug_enabled(argv)`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if debug is None:
        debug = debug_enabled(argv)
    try:
        code = main(argv)
    except SystemExit:
        raise
    except KeyboardInterrupt as e:
        print(f"{prog + ': ' if prog else ''}interrupted", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return exit_code(e)
    except Exception as e:  # noqa: BLE001  (the point: every error becomes one message)
        print(format_error(e, prog), file=sys.stderr)
        if debug:
            traceback.print_exc()
        return exit_code(e, usage)
    return 0 if code is None else int(code)
