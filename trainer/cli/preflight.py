"""Checks and resolutions that need more than the config itself, done before any expensive set-up
(sharding, model building, process groups): is ``train.output_dir`` writable, does ``model.backbone``
name a model, and which launcher settings apply.

Launcher and hardware settings: ``train.mixed_precision: auto`` resolves to the launcher's value or what this
hardware runs fastest (``trainer/config/launcher.py``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from trainer.config.fields import ConfigError
from trainer.config.schema import Config


def check_output_dir(path: str) -> None:
    """Make sure a file can be written in ``train.output_dir``. Folders created for the test are removed again:
    a start refused later (a budget too short, bad data) leaves nothing behind; the run creates its folder.

    Raises:
        ConfigError: names ``train.output_dir``, the path and the reason (not a folder, permission...).
    """
    p = Path(path)
    created = [d for d in (p, *p.parents) if not d.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"train.output_dir: cannot write into {p} ({reason})") from None
    finally:
        for d in created:  # innermost first; a folder something else wrote into meanwhile stays
            try:
                d.rmdir()
            except OSError:
                break


def preflight(cfg: Config, *, train: bool = True) -> list[str]:
    """Check ``cfg`` against the machine and the launcher; resolve launcher settings in place.

    Args:
        train: also check the output folder (not needed for ``--dry_run`` / ``--print_config``).

    Returns:
        Lines to show once (which launcher setting applies).

    Raises:
        ConfigError: naming the field or variable.
    """
    from trainer.models.build import check_model_names

    notes: list[str] = []
    check_model_names(cfg.model.backbone, cfg.model.weights)
    if train:
        check_output_dir(cfg.train.output_dir)
    return notes
