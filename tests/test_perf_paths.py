"""Performance paths: no autograd graph through a frozen backbone, config switches of issue 6.

CPU-only, tiny models, milliseconds (no data, no subprocess).
"""

from __future__ import annotations

import pytest
import torch
from helpers.fake_accelerator import CpuAccelerator
from torch import nn

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError
from trainer.finetune.freezing import apply_phase, frozen_entirely
from trainer.finetune.schedule import Phase
from trainer.models.classifier import ImageClassifier, Preprocessing
from trainer.train.loop import train_step


def _tiny(num_classes: int = 3) -> tuple[ImageClassifier, dict[str, int]]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = ImageClassifier(backbone, 16, num_classes,
                            preprocessing=Preprocessing(8, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0))
    layer_of = {n: (0 if n.startswith("backbone.0") or n.startswith("backbone.1") else 1)
                for n, _ in model.named_parameters()}
    layer_of.update({n: 2 for n in layer_of if n.startswith("head")})
    return model, layer_of


def _saved_tensor_count(fn) -> int:
    """Number of tensors autograd saves for backward while ``fn()`` runs."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


def test_frozen_backbone_runs_without_autograd_graph():
    model, layer_of = _tiny()
    apply_phase(model, layer_of, 3, Phase(0, "head"))
    assert frozen_entirely(model)
    model.train()
    seen = []
    model.backbone.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    x = torch.randn(4, 3, 8, 8)
    saved = _saved_tensor_count(lambda: model(x).sum().backward())
    assert seen == [False]  # features carry no graph: the backbone ran under no_grad
    assert saved <= 2  # only the head's linear saved its input (and weight): no backbone activations
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())

    # unfreeze everything: the graph goes through the backbone again
    apply_phase(model, layer_of, 3, Phase(0, "all"))
    seen.clear()
    saved_all = _saved_tensor_count(lambda: model(x).sum().backward())
    assert seen == [True] and saved_all > saved + 5
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_frozen_backbone_still_gives_input_gradients():
    """A caller that wants d logits / d image (saliency) with a frozen backbone still gets it."""
    model, layer_of = _tiny()
    apply_phase(model, layer_of, 3, Phase(0, "head"))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_partial_unfreeze_keeps_graph():
    model, layer_of = _tiny()
    apply_phase(model, layer_of, 3, Phase(0, 1))  # top backbone layer trains
    assert not frozen_entirely(model)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert model.backbone[3].weight.grad is not None and model.backbone[0].weight.grad is None


def test_no_grad_path_gives_the_same_step_as_the_graph_path():
    """The no_grad shortcut changes cost, not results: same loss and head update as a full graph."""
    model, layer_of = _tiny()
    apply_phase(model, layer_of, 3, Phase(0, "head"))
    model.train()
    ref = ImageClassifier(model.backbone, 16, 3)
    ref.head.load_state_dict(model.head.state_dict())
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    loss = train_step(model, iter([{"image": x, "label": y}]), optimizer=opt, criterion=nn.CrossEntropyLoss(),
                      accelerator=CpuAccelerator(), grad_accum_steps=1, grad_clip=None)
    # reference: the same step with an explicit graph through forward_features
    xf = (x.float() / 255 - 0.5) / 0.5
    ref_loss = nn.functional.cross_entropy(ref.head(ref.forward_features(xf)), y)
    ref_loss.backward()
    with torch.no_grad():
        ref_w = ref.head.weight - 0.1 * ref.head.weight.grad
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
    assert torch.allclose(model.head.weight, ref_w, atol=1e-6)


def test_feature_batches_run_only_the_head():
    model, layer_of = _tiny()
    apply_phase(model, layer_of, 3, Phase(0, "head"))
    calls = []
    model.backbone.register_forward_pre_hook(lambda m, a: calls.append(1))
    feats = torch.randn(5, 16)
    out = model(feats, features=True)
    assert out.shape == (5, 3) and calls == []
    assert torch.allclose(out, model.head(feats))


def test_config_switches():
    cfg = load_config(None, {})
    assert cfg.train.feature_cache is False and cfg.train.preempt_check_every_steps == 1
    assert cfg.model.compile is False
    cfg = load_config(None, {"data.augment": "none", "train.feature_cache": True,
                             "train.preempt_check_every_steps": 10})
    assert cfg.train.feature_cache and cfg.train.preempt_check_every_steps == 10
    with pytest.raises(ConfigError, match="train.feature_cache needs data.augment=none"):
        load_config(None, {"train.feature_cache": True})
    with pytest.raises(ConfigError, match="train.preempt_check_every_steps"):
        load_config(None, {"train.preempt_check_every_steps": 0})


def test_model_normalizes_in_its_memory_format():
    pre = Preprocessing(2, (0.5, 0.5, 0.5), (0.5, 0.25, 1.0), "bilinear", 1.0)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)  # contiguous NCHW in, channels_last out
    for channels_last in (True, False):
        model = ImageClassifier(nn.Flatten(), 12, 2, preprocessing=pre, channels_last=channels_last)
        y = model.normalize(x)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.allclose(y[0, :, 0, 0], torch.tensor([1.0, 2.0, 0.5]))
    assert "mean" not in model.state_dict() and model.mean.shape == (1, 3, 1, 1)  # not saved; follows .to()
    with pytest.raises(ValueError, match="uint8"):
        model.normalize(x.float())
    with pytest.raises(ValueError, match="without preprocessing"):
        ImageClassifier(nn.Flatten(), 12, 2).normalize(x)
    with pytest.raises(ValueError, match="0-1 units"):
        Preprocessing(224, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4), "bilinear", 0.9)


def test_configure_threads_follows_omp_num_threads_then_cores_per_local_process(monkeypatch):
    """The launcher's OMP_NUM_THREADS wins; otherwise usable cores // processes on this node (>= 1)."""
    from trainer.distributed import accelerator as acc_mod

    saved = torch.get_num_threads()
    monkeypatch.setattr(acc_mod, "_usable_cores", lambda: 8)
    try:
        assert acc_mod.configure_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) == 3
        assert torch.get_num_threads() == 3
        assert acc_mod.configure_threads({"LOCAL_WORLD_SIZE": "2"}) == 4
        assert acc_mod.configure_threads({}) == 8 and torch.get_num_threads() == 8
        assert acc_mod.configure_threads({"LOCAL_WORLD_SIZE": "16"}) == 1
        assert acc_mod.configure_threads({"OMP_NUM_THREADS": "junk"}) == 8
        from trainer.data.loader import WORKER_NICE, WORKER_TORCH_THREADS

        line = acc_mod.describe_threads(2, WORKER_TORCH_THREADS, WORKER_NICE)
        assert "torch threads 8 intra-op" in line and "2 loader worker(s) x 1 thread at nice +" in line
    finally:
        torch.set_num_threads(saved)
