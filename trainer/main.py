"""Entry point: ``accelerate launch trainer/main.py --config configs/x.yaml [--section.key=value ...]``.

The same command without ``accelerate launch`` (``python trainer/main.py ...``) is a single-process
run, for debugging. ``--dry_run`` prints the parameter-group table of the unfreeze timetable and
exits without training; ``--print_config`` prints the resolved config; ``--help`` lists every option (type,
default, range, doc) from ``trainer/config/sections/``. A YAML file holds only what differs from those
defaults, and ``--section.key=value`` overrides win over the file.

Examples::

    python trainer/main.py --config configs/ants_bees_lite0.yaml
    accelerate launch --multi_gpu --num_processes 2 trainer/main.py --config configs/ants_bees_lite0.yaml
    python trainer/main.py --config configs/ants_bees_lite0_finetune.yaml --optim.lr=3e-4 --train.epochs=5
    python trainer/main.py --config configs/ants_bees_lite0_gradual.yaml --dry_run
"""

from __future__ import annotations

import os
import sys
import time

STARTED_AT = time.time()  # a train.time_budget counts from here: the whole command

# `python trainer/main.py` puts trainer/ first on sys.path, where our module names could shadow the
# standard library; the package is imported as `trainer.*` instead.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from trainer.cli.errors import exit_on_user_error, rank, run_cli, set_log_dir, write_line  # noqa: E402
from trainer.config.loading import load_config  # noqa: E402


def main(config: str | None = None, dry_run: bool = False, print_config: bool = False, **overrides) -> None:
    """Train (or, with ``dry_run``, print the parameter-group table) for ``config`` + overrides.

    ``overrides`` are ``{"section.key": value}``; text values are read by the field's type (as on the command line:
    ``trainer.cli.args.config_overrides``). ``print_config`` prints the resolved config (defaults + YAML +
    overrides) as YAML and exits. A failure the user can fix (config field, file, checkpoint, launcher variable,
    weights) ends with one line naming it and exit status 2 (``trainer/cli/errors.py``); the checks that need
    more than the config run before any expensive set-up (``trainer/cli/preflight.py``). A run stopped by
    SIGUSR1/SIGTERM exits 0 after its checkpoint (``trainer/distributed/signals.py``).
    """
    with exit_on_user_error():
        _run(config, dry_run, print_config, overrides)


def _run(config, dry_run, print_config, overrides) -> None:
    set_log_dir(None)  # no traceback file until the run folder is known to be writable
    from trainer.cli.args import config_overrides
    # text values (the command line's) are read once, by their field's type: a str field keeps `007`
    from trainer.config.run import resolve_run
    # the launcher's and the machine's settings, resolved once for this process; cfg is not changed after
    # without a config file the run is planned to a budget: finetune.strategy auto (trainer/planner/)
    from trainer.config.loading import no_config_defaults
    values = config_overrides(overrides)
    if config is None:
        values = no_config_defaults(values)
    resolved = resolve_run(load_config(config, values, parse_strings=False), started_at=STARTED_AT)
    cfg = resolved.config
    if print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return
    from trainer.cli.preflight import preflight
    for note in (*resolved.notes, *preflight(cfg, train=not dry_run)):
        if rank() == 0:
            write_line(note)
    if dry_run:
        from trainer.train.budgeted import dry_run_plan
        cfg = dry_run_plan(resolved)  # a budgeted run: its plan table, and the config it would train with
        from trainer.finetune.dryrun import print_group_table
        print_group_table(cfg)
        return
    from trainer.train.start import run  # sets the traceback folder once the start is accepted: a refused
    # start (a config that does not fit the run folder) writes nothing into train.output_dir
    try:
        run(cfg, resolved)  # also returns normally after a preemption checkpoint: exit 0, the job requeues
    finally:
        # destroy the process group: without it gloo aborts at exit (SIGABRT) and the launcher
        # reports the run as failed
        from trainer.distributed.accelerator import shutdown
        shutdown()


def cli() -> None:
    """Console script ``finetune``: ``finetune train|predict|evaluate|export|shards|select|prefetch [options]``;
    without a subcommand it is ``finetune train`` (same as ``python trainer/main.py``)."""
    from trainer.cli.commands import run_command
    run_command(prog="finetune")


if __name__ == "__main__":
    from trainer.cli.help import config_help
    run_cli(main, help_text=config_help, prog="python trainer/main.py")
