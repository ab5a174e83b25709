"""What every launch script does the same way: one-line errors, documented exit statuses, interrupts, the budget report.

A launch script parses its arguments and hands the rest to :func:`run`::

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return cli.run(lambda: _main(args), interrupted="continue with ... --resume")

The project's errors carry a message that names the file, the key and the fix
(docs/design.md, style rule 4). :func:`run` prints it as one ``error: <message>`` on
stderr and returns the exit status of its kind (:data:`EXIT_STATUS_HELP`, which each
script's ``--help`` shows); Ctrl-C and SIGTERM end with 130 and a line saying what is
left. Any other exception is a bug and keeps its traceback.

This module imports no heavy dependency: an error type is looked up only in a module
that is already imported (an error cannot come from a module never imported).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from metafx.config import Config, ConfigError, budget_report, load_config

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed: rendering, a dataset directory, training, tracking
EXIT_BAD_INPUT = 2  # the study, an option or the input (a .dsp, the source audio) is wrong: fix it and rerun
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it)

EXIT_STATUS_HELP = """\
exit status:
  0    success
  1    the run failed: rendering (a Faust compile error, unstable settings with data.on_unstable: fail,
       too few stable tasks, disk space), a dataset directory, training (a non-finite loss), tracking
  2    bad configuration or input: the study file, a --set or other option, a slider name the .dsp
       does not have, the source audio (an unreadable file, too little audio for the slices)
  130  interrupted (Ctrl-C, or SIGTERM from a scheduler or `ray job stop`); nothing is left half-written
Errors are one line on stderr: `error: <what, where, and the fix>`."""

#: The project's error types, ``(module, class name, exit status)``, most specific first.
ERRORS: tuple[tuple[str, str, int], ...] = (
    ("metafx.config_io", "ConfigError", EXIT_BAD_INPUT),
    ("metafx.data.sources", "SourceError", EXIT_BAD_INPUT),
    ("metafx.data.plan", "RenderError", EXIT_FAILED),
    ("metafx.data.tasks", "TaskSetError", EXIT_FAILED),
    ("metafx.engines.base", "NonFiniteLossError", EXIT_FAILED),
    ("metafx.tracking", "TrackingError", EXIT_FAILED),
    ("metafx.plots", "ArtifactError", EXIT_FAILED),
)


def exit_status(e: BaseException) -> int | None:
    """The exit status of an exception of the project's types.

    Args:
        e: the exception.

    Returns:
        :data:`EXIT_INTERRUPTED` for ``KeyboardInterrupt``; the status of the first
        :data:`ERRORS` type ``e`` is an instance of; None for any other exception (a bug).
    """
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for module, name, status in ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(e, cls):
            return status
    return None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(body: Callable[[], int | None], *, interrupted: str | Callable[[], str] = "") -> int:
    """Run a launch script's body with the shared error handling.

    SIGTERM unwinds like Ctrl-C while ``body`` runs (so ``finally`` blocks close runs and
    remove temporary files).

    Args:
        body: the script's work; returns its exit status (None = 0).
        interrupted: what to print after ``interrupted: `` on Ctrl-C / SIGTERM (how to
            continue, what was kept), or a function returning it (called then).

    Returns:
        ``body``'s status; :data:`EXIT_INTERRUPTED` when interrupted; the :func:`exit_status`
        of a project error, whose message is printed as ``error: <message>`` on stderr.

    Raises:
        Exception: any exception not of the project's types, unchanged (a bug: keep its traceback).
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        hint = interrupted() if callable(interrupted) else interrupted
        print(f"interrupted{': ' + hint if hint else ''}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return status
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def load_study(space: str | os.PathLike[str], budget: str | None = None,
               overrides: Sequence[str] | None = None, *, report: bool = True) -> Config:
    """Load a study as a launch script does, and say what its budget replaces.

    Args:
        space: study name or path (``--space``).
        budget: ``--budget`` (None = the file's, else ``local``).
        overrides: the ``--set key=value`` strings (errors in them name the ``--set``).
        report: print :func:`metafx.config.budget_report` on stdout.

    Returns:
        The validated :class:`~metafx.config.Config`.

    Raises:
        ConfigError: as :func:`metafx.config.load_config`.
    """
    cfg = load_config(space, budget, list(overrides or []))
    if report:
        print(budget_report(cfg), flush=True)
    return cfg


@contextmanager
def naming_study(cfg: Config) -> Iterator[None]:
    """Make configuration errors raised inside (rendering, loading the data) name the study file.

    The data layer sees only the ``data`` section, so an error such as a grid key that names
    no slider of the .dsp cannot say which study it comes from; this prefixes the file.

    Args:
        cfg: the study.

    Raises:
        ConfigError: the error raised inside, its message starting with the study file.
    """
    try:
        yield
    except ConfigError as e:
        if str(cfg.source_file) in str(e):
            raise
        raise ConfigError(f"{cfg.source_file}: {e}", key=e.key, allowed=e.allowed) from e
