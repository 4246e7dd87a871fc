"""Choose the backbone on your own data: linear-probe accuracy against measured fine-tuning cost.

    python launch/select_backbone.py --config configs/ants_bees_lite0.yaml   # or: finetune-select-backbone ...
    python launch/select_backbone.py --data.root=/path/images --data.shard_dir=data/shards/x \\
        --candidates=timm:tf_efficientnet_lite0,timm:tf_efficientnet_lite2,resnet50 --time_budget_s=3600
    accelerate launch --multi_gpu --num_processes 2 launch/select_backbone.py --config ...

The dataset is whatever the trainer reads (``--config`` file and ``--section.key=value`` overrides,
the same as ``trainer/main.py``); batch size and precision default to ``train.micro_batch_size`` /
``train.mixed_precision``. Default candidates: every backbone whose weights are available offline
(:func:`trainer.selection.candidates.offline_candidates`). Prints the table and the recommendation
(main process); writes ``<out_dir>/selection.csv``, ``selection.png`` and ``chosen.yaml`` (the config
with the recommended backbone: ``python trainer/main.py --config <out_dir>/chosen.yaml``). A bad
option, config field or unavailable weights end as one line with exit status 2
(``trainer/cli/errors.py``). See :mod:`trainer.selection`.

Multi-label data (``--data.task=multilabel``, shards with ``labels.json`` label sets): the subset keeps every
class, the probe is the sigmoid (BCE) one and candidates are ranked by its val mAP (the table and CSV column
``probe_map``, the plot's "val mAP"); ``chosen.yaml`` keeps ``data.task: multilabel`` and the run's label fields.
"""

from __future__ import annotations

import logging

from trainer.cli.errors import run_cli
from trainer.config.schema import ConfigError

_OPTIONS = ("train_subset", "val_subset", "seed", "batch_size", "steps", "epochs", "cache_dir", "out_dir",
            "time_budget_s", "memory_budget_mib")


def read_options(config: str | None, options: dict) -> tuple:
    """``(Config, selection options)`` from ``config`` and the ``**options`` of :func:`main`.

    Text values are read once by their type (:mod:`trainer.cli.args`): a selection option by its
    :class:`~trainer.selection.select.SelectionOptions` field, a ``section.key`` by its config field.

    Raises:
        ConfigError: an unknown option, or a value that does not fit its type (names it).
    """
    from trainer.cli.args import config_overrides, convert
    from trainer.config.fields import type_hints
    from trainer.config.loading import load_config
    from trainer.selection.select import SelectionOptions

    hints = type_hints(SelectionOptions)
    opts = {k: convert(v, hints[k], f"--{k}") if isinstance(v, str) else v for k, v in options.items()
            if k in _OPTIONS}
    overrides = {k: v for k, v in options.items() if k not in _OPTIONS}
    unknown = [k for k in overrides if "." not in k and k != "name"]
    if unknown:
        raise ConfigError(f"unknown option --{unknown[0]} (options: {', '.join(_OPTIONS)}, --candidates, "
                          f"--config, --section.key=value)")
    return load_config(config, config_overrides(overrides), parse_strings=False), opts


def main(config: str | None = None, candidates: str | None = None, **options) -> None:
    """Compare backbones on the dataset of ``config`` (+ ``--section.key=value`` overrides) and recommend one.

    Args:
        config: YAML config of the run (its data, batch size, precision and epochs are used).
        candidates: ``a,b=weights,...`` (default: every backbone available offline).
        options: the fields of :class:`trainer.selection.select.SelectionOptions` (``--train_subset=1000``
            ...; listed by ``--help``); any other ``--section.key=value`` overrides the config.
    """
    from trainer.config.run import resolve_run
    from trainer.selection.candidates import parse_candidates
    from trainer.selection.select import SelectionOptions, select_backbones, summary

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg, opts = read_options(config, options)
    cfg = resolve_run(cfg).config  # the launcher's and the machine's settings, once
    try:
        cands = parse_candidates(candidates)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    selection = SelectionOptions(candidates=cands, **opts)
    selection.check()
    from trainer.distributed.accelerator import make_accelerator, shutdown

    accelerator = make_accelerator(cfg.train.mixed_precision, timeout_s=cfg.train.dist_timeout_s)
    try:
        result = select_backbones(cfg, selection, accelerator)
        if accelerator.is_main_process:
            print(summary(result, selection), flush=True)
    finally:
        shutdown()


main.keyword_options = "trainer.selection.select:SelectionOptions"  # the --help of **options


def cli() -> None:
    """Console script ``finetune-select-backbone`` (same as ``python launch/select_backbone.py``)."""
    run_cli(main, prog="finetune-select-backbone")


if __name__ == "__main__":
    run_cli(main)
