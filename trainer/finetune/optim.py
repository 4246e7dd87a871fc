"""The optimizer over named parameter groups, and the per-step learning rate of each group.

One optimizer holds every parameter of the model for the whole run, in the named groups of
``trainer.finetune.param_groups`` (layer id x decay / no decay). Frozen parameters have no gradient and are
skipped by ``optimizer.step()``; unfreezing therefore never rebuilds the optimizer, and the state
of each parameter stays where it is, which keeps resume simple (state matched by name, see
``trainer.checkpoint.state``). The learning rate of every group is set before each step by
:func:`set_lrs` from the pure schedule in ``trainer.finetune.schedule``; its only state is the step counter.
"""

from __future__ import annotations

import torch

from trainer.config.schema import FinetuneConfig, OptimConfig
from trainer.finetune.param_groups import build_param_groups
from trainer.finetune.schedule import group_lr, phase_index_at


def build_optimizer(model: torch.nn.Module, layer_of: dict[str, int], num_layers: int, optim_cfg: OptimConfig,
                    ft_cfg: FinetuneConfig):
    """AdamW or SGD over every parameter, grouped by layer id and weight-decay class.

    Returns:
        (optimizer, groups, names): ``groups`` are the dicts of ``build_param_groups`` (name, layer_id,
        lr_scale, weight_decay, param_names) in optimizer order; ``names`` maps ``id(param)`` to its name.
    """
    named = dict(model.named_parameters())
    layer_lr_scale = None
    if ft_cfg.layer_lr_scale is not None:
        layer_lr_scale = {int(k): float(v) for k, v in ft_cfg.layer_lr_scale.items()}
    groups = build_param_groups([(n, tuple(p.shape)) for n, p in named.items()], layer_of, num_layers,
                                weight_decay=optim_cfg.weight_decay, layer_decay=ft_cfg.layer_decay,
                                layer_lr_scale=layer_lr_scale)
    torch_groups = [{"params": [named[n] for n in g["param_names"]], "name": g["name"],
                     "lr": optim_cfg.lr * g["lr_scale"], "weight_decay": g["weight_decay"]} for g in groups]
    if optim_cfg.name == "adamw":
        opt = torch.optim.AdamW(torch_groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas))
    else:
        opt = torch.optim.SGD(torch_groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=True)
    names = {id(p): n for n, p in named.items()}
    return opt, groups, names


def set_lrs(optimizer, groups: list[dict], *, step: int, total_steps: int, phases, steps_per_epoch: int,
            optim_cfg: OptimConfig, head_layer_id: int) -> dict[str, float]:
    """Set every group's lr for optimizer step ``step`` (0-based) and return ``{group name: lr}``.

    lr = optim.lr x group lr_scale (layer_decay / per-layer multipliers) x warmup-cosine factor x, for
    backbone groups, the current phase's lr_scale and the linear warmup after its unfreeze.
    """
    epoch = step // steps_per_epoch
    phase = phases[phase_index_at(phases, epoch)]
    phase_start = phase.start_epoch * steps_per_epoch
    out = {}
    for g_opt, g in zip(optimizer.param_groups, groups):
        lr = group_lr(optim_cfg.lr, g["lr_scale"], step=step, total_steps=total_steps,
                      warmup_steps=optim_cfg.warmup_steps, phase=phase, phase_start_step=phase_start,
                      min_lr_ratio=optim_cfg.min_lr_ratio, is_head=g["layer_id"] == head_layer_id)
        g_opt["lr"] = lr
        out[g["name"]] = lr
    return out


