"""The one command line: ``finetune train|predict|evaluate|export|shards|select|prefetch [options]``.

Each subcommand runs the entry function of ``trainer/main.py`` or of a ``launch/`` script through
:func:`trainer.cli.errors.run_cli` (one parser, :mod:`trainer.cli.args`; one ``--help`` style,
:mod:`trainer.cli.help`). ``finetune`` without a subcommand is ``finetune train``, so
``finetune --config X`` trains. The older console scripts (``finetune-predict`` ...) and
``python launch/<script>.py`` are the same commands.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Callable, NamedTuple, Sequence


class Command(NamedTuple):
    """A subcommand: ``"module:function"`` it runs and its one-line summary for ``finetune --help``."""

    target: str
    summary: str


COMMANDS: dict[str, Command] = {
    "train": Command("trainer.main:main", "train a classifier from a config (+ --section.key=value overrides)"),
    "predict": Command("launch.predict:main", "write predictions of a checkpoint for images, a CSV list or shards"),
    "evaluate": Command("launch.evaluate:main", "evaluate a checkpoint on one split, with the test reports"),
    "export": Command("launch.export:export", "export a checkpoint to TorchScript / ONNX + preprocessing.json"),
    "shards": Command("launch.make_shards:main", "write images (folders or manifests) into WebDataset shards"),
    "select": Command("launch.select_backbone:main", "compare backbones on a config's dataset and recommend one"),
    "prefetch": Command("launch.prefetch_weights:prefetch", "download and verify pretrained weights into the cache"),
}
DEFAULT = "train"


def entry(name: str) -> Callable:
    """The entry function of subcommand ``name`` (a key of :data:`COMMANDS`)."""
    module, attr = COMMANDS[name].target.split(":")
    return getattr(importlib.import_module(module), attr)


def overview(prog: str = "finetune") -> str:
    """The ``finetune --help`` text: the subcommands with their summaries."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {prog} COMMAND [--option=VALUE ...]",
             f"       {prog} [--config FILE.yaml] [--section.field=VALUE ...]   (no COMMAND: {DEFAULT})",
             "", "Transfer-learning trainer for image classification.", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", f"{prog} COMMAND --help lists the options of COMMAND (type, default, description).",
              "Booleans: true/false, yes/no, on/off, 1/0 or a bare --flag. Bad input: one line, exit status 2."]
    return "\n".join(lines)


def run_command(argv: Sequence[str] | None = None, prog: str = "finetune") -> None:
    """Run ``prog COMMAND [options]`` (``argv`` default ``sys.argv[1:]``); no COMMAND: ``train``.

    ``prog --help`` (``-h``) without a COMMAND prints :func:`overview`; ``prog COMMAND --help`` the options
    of COMMAND. A first word that is neither a COMMAND nor an existing file (a config given positionally)
    is refused in one line. Exits like :func:`trainer.cli.errors.run_cli` (0; 2 for a user error).
    """
    from trainer.cli.errors import EXIT_USER_ERROR, run_cli, write_line

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        name, rest = argv[0], argv[1:]
    elif "-h" in argv or "--help" in argv:
        print(overview(prog))
        raise SystemExit(0)
    elif argv and not argv[0].startswith("-") and not os.path.exists(argv[0]):
        # a word that is neither a command nor a config file given positionally: a mistyped command
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        write_line(f"error: unknown command {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                   + f" (commands: {', '.join(COMMANDS)})")
        raise SystemExit(EXIT_USER_ERROR)
    else:
        name, rest = DEFAULT, argv
    help_text = None
    if name == "train":
        from trainer.cli.help import config_help
        help_text = config_help
    run_cli(entry(name), argv=rest, help_text=help_text, prog=f"{prog} {name}")
