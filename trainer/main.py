"""Entry point: ``accelerate launch trainer/main.py --config configs/x.yaml [--section.key=value ...]``.

The same command without ``accelerate launch`` (``python trainer/main.py ...``) is a single-process
run, for debugging. ``--dry_run`` prints the parameter-group table of the unfreeze timetable and
exits without training. Every option is documented in ``trainer/config/schema.py``; a YAML file holds only
what differs from those defaults, and ``--section.key=value`` overrides win over the file.

Examples::

    python trainer/main.py --config configs/ants_bees_lite0.yaml
    accelerate launch --multi_gpu --num_processes 2 trainer/main.py --config configs/ants_bees_lite0.yaml
    python trainer/main.py --config configs/ants_bees_lite0_finetune.yaml --optim.lr=3e-4 --train.epochs=5
    python trainer/main.py --config configs/ants_bees_lite0_gradual.yaml --dry_run
"""

from __future__ import annotations

import os
import sys

# `python trainer/main.py` puts trainer/ first on sys.path, where our module names could shadow the
# standard library; the package is imported as `trainer.*` instead.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import fire  # noqa: E402

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError  # noqa: E402


def _error_line(message: str) -> None:
    """Write one line to stderr in a single write, so lines of several ranks never interleave."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (" ".join(message.splitlines()) + "\n").encode())


def main(config: str | None = None, dry_run: bool = False, **overrides) -> None:
    """Train (or, with ``dry_run``, print the parameter-group table) for ``config`` + overrides.

    Exits with status 2 and one line naming the field or file on a configuration error; with status 3
    and one line on a launch/rendezvous error (``DistributedSetupError``) or unavailable / corrupt
    pretrained weights (``trainer.models.weights``). A run stopped by SIGUSR1/SIGTERM exits 0 after its
    checkpoint (``trainer/dist/signals.py``).
    """
    try:
        cfg = load_config(config, overrides)
        from trainer.models.build import check_model_names
        check_model_names(cfg.model.backbone, cfg.model.weights)
        if dry_run:
            from trainer.finetune.dryrun import print_group_table
            print_group_table(cfg)
            return
        from trainer.train.trainer import run
        try:
            run(cfg)  # also returns normally after a preemption checkpoint: exit 0, the job requeues
        finally:
            # destroy the process group: without it gloo aborts at exit (SIGABRT) and the launcher
            # reports the run as failed
            from trainer.dist.accelerator import shutdown
            shutdown()
    except ConfigError as e:
        _error_line(f"config error: {e}")
        sys.exit(2)
    except Exception as e:
        # setup errors whose message says everything (launch variables, rendezvous, offline weights):
        # one line instead of a traceback per rank
        from trainer.dist.accelerator import DistributedSetupError
        from trainer.models.weights import CorruptWeightsError, WeightsUnavailableError
        if isinstance(e, (DistributedSetupError, WeightsUnavailableError, CorruptWeightsError)):
            _error_line(f"error: {type(e).__name__}: {e}")
            sys.exit(3)
        raise


if __name__ == "__main__":
    fire.Fire(main)
