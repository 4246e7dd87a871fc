"""A failure the user can fix ends as one line, printed once, exit status 2; everything else is a bug.

User-fixable (:func:`is_user_error`): a bad config field or file (:class:`ConfigError`), an unreadable
checkpoint, launcher variables, unavailable or corrupt pretrained weights, an undecodable sample in
``strict`` mode, and missing / unreadable / unwritable files (``FileNotFoundError``, ``PermissionError``,
...). For those :func:`run_cli`

* prints ``config error: <message>`` (``error: <message>`` for the others) as ONE line on stderr, from the
  main process only (``RANK`` 0 or unset); other ranks exit with the same status silently;
* writes the full traceback to ``<output_dir>/logs/error-rank<r>.log`` once the run folder is known and
  exists (:func:`set_log_dir`; nothing is written there for errors found before any work starts);
* shows the traceback on screen too with ``TRAINER_DEBUG=1``;
* exits with status 2.

Any other exception keeps its traceback (a bug to report).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from trainer.config.fields import ConfigError

EXIT_USER_ERROR = 2
DEBUG_ENV = "TRAINER_DEBUG"

# "module:Class" of the project's user-fixable errors; checked only if the module was imported (an
# exception can only be an instance of a class whose module is loaded), so the entry stays light.
_USER_ERRORS = (
    "trainer.models.state_dict:CheckpointError",
    "trainer.distributed.accelerator:DistributedSetupError",
    "trainer.models.weights:WeightsUnavailableError",
    "trainer.models.weights:CorruptWeightsError",
    "trainer.data.stream:BadSampleError",
    "trainer.data.listing:DataError",
)
_OS_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)

_log_dir: Path | None = None


def set_log_dir(output_dir: str | Path | None) -> None:
    """Where tracebacks of user errors go from now on: ``<output_dir>/logs`` (None: nowhere). The trainer sets it
    once its start is accepted (``trainer.train.trainer.Trainer``), so a refused start writes nothing there."""
    global _log_dir
    _log_dir = None if output_dir is None else Path(output_dir) / "logs"


def rank() -> int:
    """This process's global rank as announced by the launcher (``RANK``), 0 without one."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_user_error(e: BaseException) -> bool:
    """Whether ``e`` is a failure the user can fix (see the module docstring)."""
    if isinstance(e, (ConfigError, *_OS_ERRORS)):
        return True
    for spec in _USER_ERRORS:
        module, name = spec.split(":")
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


def error_line(e: BaseException) -> str:
    """The one line shown for a user error (newlines folded)."""
    text = str(e)
    if isinstance(e, _OS_ERRORS) and getattr(e, "filename", None) and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    prefix = "config error" if isinstance(e, ConfigError) else "error"
    return " ".join(f"{prefix}: {text}".split())


def write_line(message: str) -> None:
    """Write one line to stderr in a single write, so lines of several ranks never interleave."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (" ".join(message.splitlines()) + "\n").encode())


def _write_traceback(e: BaseException) -> Path | None:
    if _log_dir is None or not _log_dir.parent.is_dir():
        return None
    try:
        _log_dir.mkdir(exist_ok=True)
        path = _log_dir / f"error-rank{rank()}.log"
        path.write_text("".join(traceback.format_exception(e)))
        return path
    except OSError:
        return None


def report(e: BaseException) -> int:
    """Report user error ``e`` as described in the module docstring; return the exit status."""
    _write_traceback(e)
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if rank() == 0:
        if debug:
            traceback.print_exception(e, file=sys.stderr)
        write_line(error_line(e))
    elif _world_size() > 1:
        # the launcher stops every process as soon as one exits: an other rank that found the same error
        # first would end the main process before its line is out. The main process reports, then exits.
        time.sleep(OTHER_RANK_EXIT_DELAY_S)
    return EXIT_USER_ERROR


OTHER_RANK_EXIT_DELAY_S = 5.0
"""Seconds a rank other than 0 waits before exiting on a user error (see :func:`report`)."""


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextlib.contextmanager
def exit_on_user_error():
    """Context: a user error inside is reported (:func:`report`) and ends the process with status 2."""
    try:
        yield
    except Exception as e:
        if not is_user_error(e):
            raise
        raise SystemExit(report(e)) from None


def run_cli(fn: Callable, *, argv: Sequence[str] | None = None, help_text: Callable[[str], str] | None = None,
            prog: str | None = None) -> None:
    """Run ``fn`` as a command, with ``-h``/``--help`` and user errors handled.

    The command line is read by :func:`trainer.cli.args.parse_command_line` (``fire`` splits the words; each
    value is converted once by the type annotation of its option, with the config loader's rules): a bad
    value, an unknown option or a missing one ends as one line, exit status 2, before ``fn`` runs.

    Args:
        fn: the entry function; its parameters are the options.
        argv: arguments (default ``sys.argv[1:]``).
        help_text: builds the ``--help`` text from ``prog`` (default: from ``fn``'s signature and docstring).
        prog: program name shown in the usage line (default ``python <script>``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"python {os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else fn.__module__}"
    if "-h" in argv or "--help" in argv:
        from trainer.cli.help import function_help

        print(help_text(prog) if help_text else function_help(fn, prog))
        raise SystemExit(0)
    from trainer.cli.args import parse_command_line

    with exit_on_user_error():
        args, kwargs = parse_command_line(fn, argv)
        fn(*args, **kwargs)
