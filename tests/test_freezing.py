"""Tests for trainer/finetune/freezing.py: requires_grad per phase and BatchNorm in frozen layers."""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.finetune.freezing import apply_phase, frozen_entirely, trainable_layer_ids
from trainer.finetune.schedule import Phase, build_phases, phase_index_at
from trainer.models.build import build_model
from trainer.models.efficientnet_lite import LITE0_BACKBONE
from trainer.models.layers import layer_ids


@pytest.fixture()
def resnet():
    torch.manual_seed(0)
    model, _ = build_model("resnet18", 3, "none")
    layer_of, n = layer_ids(model, "resnet18")
    return model, layer_of, n


def _bn_stats(model):
    return {f"{n}.{b}": getattr(m, b).clone() for n, m in model.named_modules() if isinstance(m, _BatchNorm)
            for b in ("running_mean", "running_var", "num_batches_tracked")}


def _sgd(model, lr=0.1):
    return torch.optim.SGD([p for p in model.parameters()], lr=lr)


def test_trainable_layer_ids():
    assert trainable_layer_ids(Phase(0, "head"), 6) == {5}
    assert trainable_layer_ids(Phase(0, "all"), 6) == {0, 1, 2, 3, 4, 5}
    assert trainable_layer_ids(Phase(0, 2), 6) == {3, 4, 5}
    assert trainable_layer_ids(Phase(0, 0), 6) == {5}
    with pytest.raises(ValueError, match="Phase.train=6"):
        trainable_layer_ids(Phase(0, 6), 6)


def test_failure_case_11_frozen_bn_running_stats_unchanged(resnet):
    """Frozen ResNet-18 (weights='none'), 5 SGD steps on all-white images after model.train():
    running_mean/var of every frozen BN unchanged, also after each epoch's model.train()."""
    model, layer_of, n = resnet
    summary = apply_phase(model, layer_of, n, Phase(0, "head"))
    assert summary["trainable_layer_ids"] == [5] and summary["backbone_frozen"] is True
    assert summary["trainable_params"] == 512 * 3 + 3 and summary["frozen_bn_modules"] == 20
    assert frozen_entirely(model)
    before = _bn_stats(model)
    conv_before = model.backbone.layer4[1].conv2.weight.clone()
    head_before = model.head.weight.clone()
    opt = _sgd(model)
    images = torch.ones(4, 3, 64, 64)  # all white
    labels = torch.tensor([0, 1, 2, 0])
    for epoch in range(5):
        model.train()  # each epoch re-enters train mode
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    after = _bn_stats(model)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(conv_before, model.backbone.layer4[1].conv2.weight)
    assert not torch.equal(head_before, model.head.weight)
    assert all(p.grad is None for p in model.backbone.parameters())


def test_requires_grad_per_phase_and_unfreeze(resnet):
    model, layer_of, n = resnet
    apply_phase(model, layer_of, n, Phase(0, 2))  # layer3, layer4 + head
    for name, p in model.named_parameters():
        assert p.requires_grad == (layer_of[name] >= 3), name
    assert not frozen_entirely(model)
    model.train()
    x = torch.rand(2, 3, 32, 32)
    stats = _bn_stats(model)
    model(x)
    after = _bn_stats(model)
    # the pre-hook puts frozen BN back into eval mode at the first forward after model.train()
    assert model.backbone.layer3[0].bn1.training and model.backbone.layer4[1].bn2.training
    assert not model.backbone.bn1.training and not model.backbone.layer2[0].bn1.training
    assert torch.equal(stats["backbone.layer1.0.bn1.running_mean"], after["backbone.layer1.0.bn1.running_mean"])
    assert not torch.equal(stats["backbone.layer3.0.bn1.running_mean"], after["backbone.layer3.0.bn1.running_mean"])

    # unfreeze everything while in train mode: BN follows model.train() again at once
    summary = apply_phase(model, layer_of, n, Phase(1, "all"))
    assert summary["frozen_bn_modules"] == 0
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    stats = _bn_stats(model)
    model(x)
    assert not torch.equal(stats["backbone.bn1.running_mean"], _bn_stats(model)["backbone.bn1.running_mean"])
    # hooks registered once per BN module, however many phases
    apply_phase(model, layer_of, n, Phase(2, "head"))
    assert all(len(m._forward_pre_hooks) == 1 for m in model.modules() if isinstance(m, _BatchNorm))
    assert not model.backbone.layer4[1].bn2.training
    # model.eval() / train() round trip keeps frozen BN in eval
    model.eval()
    model.train()
    model(x)
    assert not model.backbone.layer4[1].bn2.training


def test_gradual_unfreeze_top_down(resnet):
    model, layer_of, n = resnet
    phases = build_phases(gradual_every=1, gradual_start_epoch=1, num_backbone_layers=n - 1, epochs=7)
    seen = []
    for epoch in range(7):
        apply_phase(model, layer_of, n, phases[phase_index_at(phases, epoch)])
        seen.append({layer_of[k] for k, p in model.named_parameters() if p.requires_grad})
    assert seen == [{5}, {4, 5}, {3, 4, 5}, {2, 3, 4, 5}, {1, 2, 3, 4, 5}, {0, 1, 2, 3, 4, 5}, {0, 1, 2, 3, 4, 5}]


def test_bn_affine_policy(resnet):
    model, layer_of, n = resnet
    summary = apply_phase(model, layer_of, n, Phase(0, "head"), frozen_bn="affine")
    assert model.backbone.bn1.weight.requires_grad and model.backbone.layer2[0].bn2.bias.requires_grad
    assert not model.backbone.conv1.weight.requires_grad
    assert not frozen_entirely(model) and summary["frozen_bn_modules"] == 20
    stats = _bn_stats(model)
    w_before = model.backbone.layer1[0].bn1.weight.clone()
    opt = _sgd(model, lr=0.5)
    model.train()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 1])).backward()
        opt.step()
    for k, v in _bn_stats(model).items():
        assert torch.equal(stats[k], v), k
    assert not torch.equal(w_before, model.backbone.layer1[0].bn1.weight)


def test_timm_batchnormact_frozen():
    model, _ = build_model(LITE0_BACKBONE, 2, "none")
    layer_of, n = layer_ids(model, LITE0_BACKBONE)
    apply_phase(model, layer_of, n, Phase(0, 1))  # last stage (blocks.6 + conv_head + bn2) + head
    model.train()
    stats = _bn_stats(model)
    model(torch.rand(2, 3, 64, 64))
    after = _bn_stats(model)
    assert torch.equal(stats["backbone.blocks.5.3.bn3.running_var"], after["backbone.blocks.5.3.bn3.running_var"])
    assert torch.equal(stats["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])
    assert not torch.equal(stats["backbone.bn2.running_mean"], after["backbone.bn2.running_mean"])
    assert type(model.backbone.bn2).__name__ == "BatchNormAct2d"


def test_errors(resnet):
    model, layer_of, n = resnet
    with pytest.raises(ValueError, match="finetune.frozen_bn"):
        apply_phase(model, layer_of, n, Phase(0, "head"), frozen_bn="train")
    with pytest.raises(ValueError, match="head.bias"):
        apply_phase(model, {k: v for k, v in layer_of.items() if k != "head.bias"}, n, Phase(0, "head"))


def test_bn_stats_frozen_keeps_running_stats_in_trainable_layers():
    """finetune.bn_stats=frozen: every BN stays in eval mode, but the BN scale/shift of trainable layers learn."""
    import torch

    from trainer.finetune.schedule import Phase
    from trainer.models.build import build_model
    from trainer.models.layers import layer_ids

    torch.manual_seed(0)
    model, _ = build_model("resnet18", 3, "none")
    layer_of, n = layer_ids(model, "resnet18")
    apply_phase(model, layer_of, n, Phase(start_epoch=0, train="all"), bn_stats="frozen")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    gamma = model.backbone.layer4[1].bn2.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = model(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(gamma, model.backbone.layer4[1].bn2.weight)
