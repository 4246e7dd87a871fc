"""Choose the backbone on your own data: linear-probe accuracy against measured fine-tuning cost.

    python launch/select_backbone.py --config configs/ants_bees_lite0.yaml
    python launch/select_backbone.py --data.root=/path/images --data.shard_dir=data/shards/x \\
        --candidates=timm:tf_efficientnet_lite0,timm:tf_efficientnet_lite2,resnet50 --time_budget_s=3600
    accelerate launch --multi_gpu --num_processes 2 launch/select_backbone.py --config ...

The dataset is whatever the trainer reads (``--config`` file and ``--section.key=value`` overrides,
the same as ``trainer/main.py``); batch size and precision default to ``train.micro_batch_size`` /
``train.mixed_precision``. Default candidates: every backbone whose weights are available offline
(:func:`trainer.selection.candidates.offline_candidates`). Prints the table and the recommendation
(main process); writes ``<out_dir>/selection.csv``, ``selection.png`` and ``chosen.yaml`` (the config
with the recommended backbone: ``python trainer/main.py --config <out_dir>/chosen.yaml``). Exit
status 2 with one line on a configuration error, 3 on unavailable weights, 4 when no candidate fits
the budget. See :mod:`trainer.selection`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import fire  # noqa: E402

from trainer.config.loading import load_config  # noqa: E402
from trainer.config.schema import ConfigError  # noqa: E402

_OPTIONS = ("train_subset", "val_subset", "seed", "batch_size", "steps", "epochs", "cache_dir", "out_dir",
            "time_budget_s", "memory_budget_mib")


def _error_line(message: str) -> None:
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (" ".join(message.splitlines()) + "\n").encode())


def main(config: str | None = None, candidates=None, **kwargs) -> None:
    """Run the selection. Options: see :class:`trainer.selection.select.SelectionOptions`
    (``--train_subset=1000 --val_subset=500 --seed=0 --batch_size --steps=3 --epochs
    --cache_dir=data/feature_cache --out_dir=runs/select_backbone --time_budget_s --memory_budget_mib``);
    ``--candidates=a,b=weights,...``; any other ``--section.key=value`` overrides the config."""
    import logging

    from trainer.dist.accelerator import shutdown

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    try:
        from trainer.selection.candidates import parse_candidates
        from trainer.selection.select import SelectionOptions, select_backbones, summary

        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTIONS}
        unknown = [k for k in kwargs if "." not in k and k != "name"]
        if unknown:
            raise ConfigError(f"unknown option --{unknown[0]} (options: {', '.join(_OPTIONS)}, --candidates, "
                              f"--config, --section.key=value)")
        cfg = load_config(config, kwargs)
        try:
            cands = parse_candidates(candidates)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        options = SelectionOptions(candidates=cands, **opts)
        options.check()
        from trainer.dist.accelerator import make_accelerator

        accelerator = make_accelerator(cfg.train.mixed_precision, timeout_s=cfg.train.dist_timeout_s)
        result = select_backbones(cfg, options, accelerator)
        if accelerator.is_main_process:
            print(summary(result, options), flush=True)
        shutdown()
        if accelerator.is_main_process and result.chosen is None:
            sys.exit(4)
    except ConfigError as e:
        _error_line(f"config error: {e}")
        sys.exit(2)
    except (RuntimeError, ValueError) as e:
        from trainer.models.weights import CorruptWeightsError, WeightsUnavailableError
        if isinstance(e, (WeightsUnavailableError, CorruptWeightsError)) or "weights" in str(e):
            _error_line(f"error: {type(e).__name__}: {e}")
            sys.exit(3)
        raise


if __name__ == "__main__":
    fire.Fire(main)
