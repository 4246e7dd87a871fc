"""Dry run: the parameter-group table of a config, without data loading or training.

``python trainer/main.py --config configs/x.yaml --dry_run`` prints, for every optimizer group
(layer id x weight-decay class), its layer name, parameter count, peak lr, weight decay, and whether
it trains in each phase of the unfreeze timetable. Nothing is downloaded: the backbone is built
with random weights (the table depends only on the architecture).

The head size is read from the data the config names, in the order a run reads it
(:mod:`trainer.data.prepare`): ``data.train_shards`` -> ``dataset.json``; ``data.manifest`` / ``data.root``
-> listed (:mod:`trainer.data.listing`, :mod:`trainer.data.manifest`); else ``shard_dir/dataset.json``.
Nothing is written or downloaded. The first line says ``N classes: a, b, ...`` and the split sizes, or
that the data cannot be read (and why); the table then assumes 2 classes.
"""

from __future__ import annotations

from trainer.config.schema import Config, ConfigError, DataConfig
from trainer.data.listing import DataError
from trainer.data.survey import survey_data
from trainer.finetune.freezing import trainable_layer_ids
from trainer.finetune.param_groups import build_param_groups, format_group_table
from trainer.finetune.schedule import build_phases_for
from trainer.models.build import build_model
from trainer.models.layers import group_names, layer_ids


def data_line(data: DataConfig) -> tuple[str, int | None]:
    """``(line, num_classes)`` of the dry run: :meth:`trainer.data.survey.DataSurvey.line` of the data ``data``
    names (read without writing or downloading), or ``data: cannot be read (<reason>); ...`` and None."""
    try:
        survey = survey_data(data, download=False, image_sizes=False)
    except (ConfigError, DataError, OSError, ValueError) as e:
        return f"data: cannot be read ({' '.join(str(e).split())}); the table below assumes 2 classes", None
    return survey.line(), len(survey.classes)


def group_table(cfg: Config, num_classes: int | None = None) -> str:
    """The dry-run text for ``cfg`` (see module docstring): the data line, the phases and the group table.

    Args:
        num_classes: head size; default: the class count of :func:`data_line` (2 when the data
            cannot be read). Given, no data is read and the data line is left out.
    """
    head = ""
    if num_classes is None:
        head, num_classes = data_line(cfg.data)
        head, num_classes = head + "\n", num_classes or 2
    model, _ = build_model(cfg.model.backbone, num_classes, "none", drop_rate=cfg.model.drop_rate)
    layer_of, num_layers = layer_ids(model, cfg.model.backbone)
    names = group_names(model, cfg.model.backbone)
    phases = build_phases_for(cfg, num_layers)
    lr_scale = None
    if cfg.finetune.layer_lr_scale is not None:
        lr_scale = {int(k): float(v) for k, v in cfg.finetune.layer_lr_scale.items()}
    params = dict(model.named_parameters())
    groups = build_param_groups([(n, tuple(p.shape)) for n, p in params.items()], layer_of, num_layers,
                                weight_decay=cfg.optim.weight_decay, layer_decay=cfg.finetune.layer_decay,
                                layer_lr_scale=lr_scale)
    for g in groups:
        g["name"] = f"{g['name']} ({names[g['layer_id']]})"
    table = format_group_table(groups, {n: p.numel() for n, p in params.items()}, cfg.optim.lr,
                               [trainable_layer_ids(p, num_layers) for p in phases])
    timeline = "\n".join(f"  phase{i}: from epoch {p.start_epoch}: train={p.train} lr_scale={p.lr_scale} "
                         f"warmup_steps={p.warmup_steps}" for i, p in enumerate(phases))
    return (f"{head}backbone {cfg.model.backbone}: {num_layers} layer ids (0 = stem, {num_layers - 1} = head), "
            f"{num_classes} classes\nphases:\n{timeline}\n{table}")


def print_group_table(cfg: Config) -> None:
    """Print :func:`group_table`."""
    print(group_table(cfg))


