"""finetune.l2_sp: decoupled weight decay toward the pretrained weights (trainer/finetune/l2sp.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.finetune.l2sp import StartingPointDecay
from trainer.finetune.param_groups import build_param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


def _setup(strength: float, lr: float = 0.1, weight_decay: float = 0.05):
    torch.manual_seed(0)
    net = Net()
    named = dict(net.named_parameters())
    layer_of = {n: (2 if n.startswith("head") else 0 if n.startswith("backbone.0") else 1) for n in named}
    groups = build_param_groups([(n, tuple(p.shape)) for n, p in named.items()], layer_of, 3,
                                weight_decay=weight_decay, layer_decay=0.5)
    opt = torch.optim.AdamW([{"params": [named[n] for n in g["param_names"]], "lr": lr * g["lr_scale"],
                              "weight_decay": g["weight_decay"]} for g in groups], lr=lr)
    return net, opt, groups, StartingPointDecay(opt, groups, head_layer_id=2, strength=strength)


def test_pull_is_lr_times_strength_of_the_distance_on_backbone_weights_only():
    net, opt, groups, sp = _setup(strength=2.0)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    # covered: the two backbone Linear weights (layers 0 and 1); biases, the norm and the head are not
    assert sp.num_params == 32
    for g_opt, g in zip(opt.param_groups, groups):
        covered = g["layer_id"] != 2 and g["weight_decay"] > 0
        assert g_opt["weight_decay"] == (0.0 if covered else g["weight_decay"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # every parameter 1 away from its start
    net.backbone[2].weight.requires_grad_(False)  # a frozen layer is left alone
    moved = {n: p.detach().clone() for n, p in net.named_parameters()}
    sp.step()
    after = dict(net.named_parameters())
    lr0 = opt.param_groups[0]["lr"]  # layer 0: 0.1 x 0.5^2
    torch.testing.assert_close(after["backbone.0.weight"], moved["backbone.0.weight"] - lr0 * 2.0 * 1.0)
    assert (after["backbone.0.weight"] - start["backbone.0.weight"]).abs().max() < 1.0
    for name in ("backbone.0.bias", "backbone.1.weight", "backbone.2.weight", "backbone.2.bias", "head.weight",
                 "head.bias"):
        assert torch.equal(after[name], moved[name]), name


def test_pull_never_overshoots_the_start():
    net, opt, _, sp = _setup(strength=1e4)  # lr x strength far above 1
    start = net.backbone[0].weight.detach().clone()
    with torch.no_grad():
        net.backbone[0].weight.add_(0.5)
    sp.step()
    torch.testing.assert_close(net.backbone[0].weight.detach(), start)


def test_strength_must_be_positive():
    with pytest.raises(ValueError, match="l2_sp"):
        _setup(strength=0.0)


def test_training_stays_closer_to_the_start_with_l2_sp():
    """Same data, same steps: the backbone drifts less from its starting weights under L2-SP."""
    def drift(strength):
        net, opt, _, sp = _setup(strength=strength or 1.0, lr=0.05)
        if not strength:
            sp.covered = []
        start = [p.detach().clone() for p in net.backbone.parameters()]
        gen = torch.Generator().manual_seed(1)
        for _ in range(50):
            x = torch.randn(16, 4, generator=gen)
            y = (x[:, 0] > 0).long()
            loss = nn.functional.cross_entropy(net.head(net.backbone(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.step()
        return sum((p.detach() - s).norm() ** 2 for p, s in zip(net.backbone.parameters(), start)).sqrt().item()

    free, pulled = drift(None), drift(20.0)
    assert pulled < 0.7 * free, (pulled, free)


def test_config_refuses_l2_sp_without_pretrained_weights():
    from trainer.config.loading import load_config
    from trainer.config.schema import ConfigError

    assert load_config(None, {"finetune.l2_sp": 1000}).finetune.l2_sp == 1000
    with pytest.raises(ConfigError, match="finetune.l2_sp"):
        load_config(None, {"finetune.l2_sp": 1000, "model.weights": "none"})
    with pytest.raises(ConfigError, match="finetune.l2_sp"):
        load_config(None, {"finetune.l2_sp": 0})
