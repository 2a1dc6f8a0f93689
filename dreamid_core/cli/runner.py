"""The one runner every command line's ``main()`` goes through: same logging, same exit codes.

- exit 0: done (or the ``int`` the command returns);
- exit 2: a mistake the user can fix (a :class:`DreamIDError`, a bad value, a missing or existing
  file): its message on one line, no traceback (``--verbose`` adds the traceback);
- exit 130: interrupted (Ctrl-C);
- exit 1: anything else, a bug: logged with its traceback.

Usage::

    def main(argv=None) -> int:
        return run_main(run, build_parser().parse_args(argv))
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import sys
from collections.abc import Callable

from ..errors import DreamIDError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# What a user did wrong (a value, a path) rather than what the code did wrong.
USER_ERRORS: tuple[type[BaseException], ...] = (DreamIDError, ValueError, FileNotFoundError, FileExistsError)


def log_level(args: argparse.Namespace) -> int | str:
    """``--verbose`` -> DEBUG, else ``--log-level`` where the command has one, else INFO."""
    if getattr(args, "verbose", False):
        return logging.DEBUG
    return str(getattr(args, "log_level", None) or "INFO").upper()


def setup_logging(level: int | str) -> None:
    """Log to stderr (stdout stays free for a command's JSON output)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def _command_name(run: Callable) -> str:
    """The command the user typed (``training.train`` for ``python -m training.train``, also when a shim such as
    ``training.evaluate_identities`` hands on to another module), else the module ``run`` lives in; never ``.cli``."""
    module = getattr(run, "__module__", None) or __name__
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    typed = getattr(spec, "name", None) or ""  # `python -m X`: X (X.__main__ for a package)
    if module == "__main__" or typed.split(".")[0] == module.split(".")[0]:
        module = typed or module  # the command the user typed, also when a shim hands on to another module
    for tail in (".__main__", ".cli"):  # a stage's command is its package: training.train, not training.train.cli
        module = module.removesuffix(tail)
    return module


def run_main(run: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Set up logging from ``args``, call ``run(args)`` and map what it raises to an exit code.

    An ``int`` that ``run`` returns is the exit code; anything else it returns (a summary) means 0.
    """
    setup_logging(log_level(args))
    log = logging.getLogger(_command_name(run))
    verbose = bool(getattr(args, "verbose", False))
    try:
        code = run(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        log.error("%s", exc, exc_info=verbose)
        return EXIT_USAGE
    except Exception:
        log.exception("unexpected error (a bug: please report it with this traceback)")
        return EXIT_BUG
    return code if isinstance(code, int) and not isinstance(code, bool) else EXIT_OK


def describe(doc: str | None) -> str:
    """A module docstring's first paragraph as ``--help`` text, without reST markup (````code````, ``:mod:`x```)."""
    text = (doc or "").split("\n\n")[0]
    text = re.sub(r":[a-z]+:`~?([^`]*)`", r"\1", text)
    return text.replace("``", "")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default, also for options without help text; none for required
    options, for defaults there is nothing to show of (None, False, [], "") and where the help already says it."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        d = action.default
        return not (action.required or d is None or d is False or d is argparse.SUPPRESS or d == [] or d == "")

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default" in text or text.startswith("default:") or not self._shows_default(action):
            return text
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help and action.help.strip()) and action.option_strings and self._shows_default(action):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)
