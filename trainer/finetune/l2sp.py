"""L2-SP: weight decay toward the pretrained weights instead of toward zero (``finetune.l2_sp``).

Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks"
(ICML 2018) regularise the backbone's weights ``w`` toward their pretrained values ``w0`` with
``alpha / 2 * ||w - w0||^2`` (plain L2 on the new head): the fine-tuned network may move only as far
from the pretrained one as the data pays for, which matters most when the target set is small.

Here it is applied *decoupled*, in the form AdamW applies weight decay (Loshchilov & Hutter 2019):
after each ``optimizer.step()``, every backbone weight that trains moves toward its starting value by
``lr_group * strength`` of the distance,

    w <- w - min(1, lr_group * strength) * (w - w0),

with ``lr_group`` the group's lr of that step (layer-wise decay, warmup and cosine included), and these
groups' own ``weight_decay`` (decay toward zero) switched off. The head and the parameters without weight
decay (biases, normalisation) keep what ``trainer.finetune.param_groups`` gives them. ``strength`` plays
the role of AdamW's ``weight_decay``: with ``lr`` 1e-3 and ``strength`` 100, a weight closes 10% of its
distance to ``w0`` per step (at most all of it: the factor is capped at 1, so a large ``lr x strength``
cannot overshoot ``w0``). Since Adam moves a weight by about ``lr`` per step, the distance it can keep from
``w0`` is about ``1 / strength`` in weight units, at any lr: ``strength`` 1000 allows ~1e-3.

``w0`` is captured right after the model is built with its pretrained weights, before any checkpoint
is restored, so a resumed run pulls toward the same values as the uninterrupted one; it costs one copy
of the backbone's decayed weights in memory, and nothing in the checkpoint.
"""

from __future__ import annotations

import torch

__all__ = ["StartingPointDecay"]


class StartingPointDecay:
    """Decoupled L2-SP over an optimizer's backbone groups (module docstring).

    Args:
        optimizer: the run's optimizer (groups in the order of ``groups``); the ``weight_decay`` of the
            groups it covers is set to 0.
        groups: the group dicts of :func:`trainer.finetune.param_groups.build_param_groups`
            (``layer_id``, ``weight_decay``).
        head_layer_id: layer id of the head (not covered).
        strength: pull toward ``w0`` per unit of lr, > 0.

    The covered groups are the backbone groups with weight decay > 0 (weights, not biases or norms).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, groups: list[dict], *, head_layer_id: int, strength: float):
        if not strength > 0:
            raise ValueError(f"finetune.l2_sp must be > 0, got {strength}")
        self.strength = float(strength)
        self.covered: list[tuple[dict, list[torch.Tensor], list[torch.Tensor]]] = []
        for g_opt, g in zip(optimizer.param_groups, groups):
            if g["layer_id"] == head_layer_id or not g["weight_decay"] > 0:
                continue
            g_opt["weight_decay"] = 0.0
            params = list(g_opt["params"])
            self.covered.append((g_opt, params, [p.detach().clone() for p in params]))

    @property
    def num_params(self) -> int:
        """Number of scalar weights pulled toward their starting values."""
        return sum(p.numel() for _, params, _ in self.covered for p in params)

    @torch.no_grad()
    def step(self) -> None:
        """Apply the pull once; call after each ``optimizer.step()``. Frozen parameters
        (``requires_grad`` False: layers not unfrozen yet) are left alone."""
        for g_opt, params, starts in self.covered:
            pairs = [(p, p0) for p, p0 in zip(params, starts) if p.requires_grad]
            if not pairs:
                continue
            ps = [p for p, _ in pairs]
            diffs = torch._foreach_sub(ps, [p0 for _, p0 in pairs])
            torch._foreach_add_(ps, diffs, alpha=-min(1.0, g_opt["lr"] * self.strength))
