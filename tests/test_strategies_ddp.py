"""Fine-tuning strategies under DDP (failure cases 8-11 of docs/failure-cases.md) and the cost of frozen parts.

The 2-process tests run the real trainer (``trainer/main.py``) or the helper
``tests/helpers/ddp_phase_step.py`` under ``accelerate launch --multi_gpu --num_processes 2`` (DDP
over gloo on CPU) on a tiny shard set written from 16 training and 8 validation images of the
ants/bees folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.realdata import run_metrics
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.finetune.freezing import apply_phase, frozen_entirely
from trainer.finetune.schedule import Phase
from trainer.models.build import build_model
from trainer.models.efficientnet_lite import LITE0_BACKBONE
from trainer.models.layers import layer_ids

REPO = Path(__file__).resolve().parents[1]
IMAGES = Path(os.environ.get("TRAINER_TEST_IMAGES", "/work/shared/data/hymenoptera_data"))
if not IMAGES.is_dir():
    IMAGES = REPO.parent / "shared" / "data" / "hymenoptera_data"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TIMEOUT_S = 420
N_TRAIN_PER_CLASS, N_VAL_PER_CLASS = 8, 4
STEPS_PER_EPOCH = 4  # 16 training images / global batch 4

needs_images = pytest.mark.skipif(not IMAGES.is_dir(), reason=f"ants/bees images not found at {IMAGES}")


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """Shards of 4 samples from the first 8 train / 4 val images of each class (4 train, 2 val shards)."""
    from trainer.data.shard_writer import write_shards

    root = tmp_path_factory.mktemp("tiny_images")
    for split, n in (("train", N_TRAIN_PER_CLASS), ("val", N_VAL_PER_CLASS)):
        for cls in ("ants", "bees"):
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in sorted((IMAGES / split / cls).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    out = tmp_path_factory.mktemp("tiny_shards")
    write_shards(root, out, max_samples_per_shard=4)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], nproc: int = 2, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments) under accelerate launch with ``nproc`` CPU processes."""
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TRAINER_OFFLINE": "1"}
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung: {' '.join(cmd)} did not finish in {timeout} s\n{(e.stdout or b'')[-3000:]!r}"
                    f"\n{(e.stderr or b'')[-3000:]!r}")
    return res


def _train(tmp: Path, shards: Path, name: str, cfg: dict, *, nproc: int = 2, **overrides) -> tuple[Path, str]:
    """Run ``trainer/main.py`` with a YAML config (tiny shards, ResNet-18 without weights by default).

    Returns:
        (run directory, combined stdout + stderr). Fails the test on a non-zero exit status.
    """
    base = {"name": name,
            "data": {"shard_dir": str(shards), "num_workers": 0, "shuffle_buffer": 8},
            "model": {"backbone": "resnet18", "weights": "none"},
            "optim": {"lr": 3e-3, "weight_decay": 1e-4, "warmup_steps": 2},
            "train": {"epochs": 3, "global_batch_size": 4, "micro_batch_size": 2, "seed": 0,
                      "output_dir": str(tmp / name), "log_every_steps": 1},
            "logging": {"wandb": "disabled", "progress": False}}
    for section, values in cfg.items():
        base.setdefault(section, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    args = ["trainer/main.py", "--config", str(path)] + [f"--{k}={v}" for k, v in overrides.items()]
    if nproc == 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TRAINER_OFFLINE": "1"}
        res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    else:
        res = _launch(args, nproc=nproc)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    return tmp / name, log


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _bn_buffers(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# ---------------------------------------------------------------------------------------------
# failure cases 8-11 (2 processes)


@needs_images
@pytest.mark.slow
def test_case8_frozen_resnet18_two_ranks(tmp_path, tiny_shards):
    """Frozen ResNet-18 backbone, 2 ranks, 3 steps: no find_unused_parameters needed, no reduction error,
    the backbone (weights and BN statistics) is unchanged and the head trained."""
    run_dir, log = _train(tmp_path, tiny_shards, "case8", {"finetune": {"freeze": "backbone"}},
                          **{"train.max_steps": 3})
    assert "Expected to have finished reduction" not in log
    assert "find_unused_parameters" not in log
    state = _last(run_dir)
    assert state["step"] == 3 and state["world_size"] == 2
    torch.manual_seed(0)
    init, _ = build_model("resnet18", 2, "none")
    init_sd = init.state_dict()
    changed = [k for k, v in state["model"].items() if not torch.equal(v, init_sd[k])]
    assert set(changed) == {"head.weight", "head.bias"}, changed[:5]


@needs_images
@pytest.mark.slow
def test_case9_phase_change_under_ddp(tmp_path):
    """Backbone frozen in epoch 0 and unfrozen in epoch 1, and the reverse, with 2 ranks fed different
    data: newly trainable weights change and are bit-identical on both ranks; parameters that became
    frozen stop changing; nothing hangs (helper tests/helpers/ddp_phase_step.py)."""
    res = _launch(["tests/helpers/ddp_phase_step.py", str(tmp_path), "unfreeze,freeze"])
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]

    def load(mode, rank, tag):
        return torch.load(tmp_path / f"{mode}_rank{rank}_{tag}.pt", weights_only=True)

    for mode in ("unfreeze", "freeze"):
        init = load(mode, 0, "init")["state"]
        for epoch in (0, 1):
            r0, r1 = load(mode, 0, f"epoch{epoch}"), load(mode, 1, f"epoch{epoch}")
            params = r0["trainable"]
            assert r0["trainable"] == r1["trainable"]
            for k in r0["state"]:
                if k.endswith(("weight", "bias")):  # parameters; BN buffers are per-rank between forwards
                    assert torch.equal(r0["state"][k], r1["state"][k]), f"{mode} epoch {epoch}: {k} differs"
            if mode == "unfreeze" and epoch == 0:
                assert params == ["head.weight", "head.bias"]
                assert all(torch.equal(v, init[k]) for k, v in r0["state"].items() if k.startswith("backbone."))
        e0, e1 = load(mode, 0, "epoch0")["state"], load(mode, 0, "epoch1")["state"]
        backbone_w = [k for k in e0 if k.startswith("backbone.") and k.endswith(("weight", "bias"))]
        moved = [k for k in backbone_w if not torch.equal(e0[k], e1[k])]
        if mode == "unfreeze":  # newly trainable backbone weights changed in epoch 1
            assert len(moved) == len(backbone_w), sorted(set(backbone_w) - set(moved))[:5]
        else:  # backbone frozen in epoch 1: weights (and, in eval mode, BN statistics) stay
            assert moved == []
            assert all(torch.equal(e0[k], e1[k]) for k in _bn_buffers(e0) if k.startswith("backbone."))
        assert not torch.equal(e0["head.weight"], e1["head.weight"])


@needs_images
@pytest.mark.slow
def test_case10_resume_across_unfreeze_is_identical(tmp_path, tiny_shards):
    """Head only for epochs 0-1, everything at 0.1x lr from epoch 2. A 2-process run stopped by
    max_steps one step after the unfreeze and resumed in fresh processes ends bit-identical (within
    1e-6) to an uninterrupted run; the optimizer state of the unfrozen backbone is in the checkpoint
    keyed by name and the lrs after the resume equal the uninterrupted run's."""
    cfg = {"finetune": {"phases": [{"start_epoch": 0, "train": "head"},
                                   {"start_epoch": 2, "train": "all", "lr_scale": 0.1}]}}
    full, _ = _train(tmp_path, tiny_shards, "full", cfg)
    stop_at = 2 * STEPS_PER_EPOCH + 1
    part, _ = _train(tmp_path, tiny_shards, "part", cfg, **{"train.max_steps": stop_at})
    mid = _last(part)
    assert mid["step"] == stop_at and mid["epoch"] == 2  # phase 1 (all) since epoch 2
    opt_state = mid["optimizer"]["state"]
    assert "backbone.conv1.weight" in opt_state and "head.weight" in opt_state
    assert opt_state["backbone.conv1.weight"]["exp_avg"].shape == mid["model"]["backbone.conv1.weight"].shape
    # state keyed by parameter name, hyper-parameters by group name (stem, layer1-4, head x decay class)
    assert set(mid["optimizer"]["groups"]) == {f"layer{i:02d}_{k}" for i in range(6) for k in ("decay", "no_decay")}
    _, log = _train(tmp_path, tiny_shards, "part", cfg)  # same output_dir: resumes from last.pt
    assert "resumed from" in log

    a, b = _last(full), _last(part)
    assert a["step"] == b["step"] == 3 * STEPS_PER_EPOCH and a["epoch"] == b["epoch"] == 3
    diffs = {k: (a["model"][k].double() - b["model"][k].double()).abs().max().item()
             for k in a["model"] if a["model"][k].is_floating_point()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-6, f"resumed run differs: {worst} by {diffs[worst]:g}"
    for name, s in a["optimizer"]["state"].items():
        assert torch.allclose(s["exp_avg"], b["optimizer"]["state"][name]["exp_avg"], atol=1e-7), name

    def lrs(run_dir):
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("lr/")} for r in run_metrics(run_dir)
                if "lr/layer00_decay" in r}
    la, lb = lrs(full), lrs(part)
    assert la == {s: lb[s] for s in la}  # same schedule before and after the resume
    assert la[stop_at + 1]["lr/layer00_decay"] > 0  # the backbone trains after the unfreeze


@needs_images
@pytest.mark.slow
def test_compiled_model_under_ddp_resumes_across_an_unfreeze(tmp_path, tiny_shards):
    """``model.compile: true`` with 2 ranks: the in-place compiled model is wrapped in DDP, re-wrapped at
    the unfreeze (epoch 1) and resumed in fresh processes from a ``last.pt`` written before it; the
    checkpoint has the plain model's keys, the replicas stay identical and the backbone trains after
    the unfreeze (a tiny timm model keeps the compile time short)."""
    cfg = {"model": {"backbone": "timm:test_efficientnet", "weights": "none", "compile": True},
           "finetune": {"phases": [{"start_epoch": 0, "train": "head"}, {"start_epoch": 1, "train": "all"}]},
           "train": {"epochs": 2}}
    run_dir, _ = _train(tmp_path, tiny_shards, "compiled", cfg, **{"train.max_steps": STEPS_PER_EPOCH})
    mid = _last(run_dir)
    assert mid["step"] == STEPS_PER_EPOCH and mid["epoch"] == 1
    plain, _ = build_model("timm:test_efficientnet", 2, "none")
    assert set(mid["model"]) == set(plain.state_dict())  # no "_orig_mod." prefixes
    _, log = _train(tmp_path, tiny_shards, "compiled", cfg)  # resumes, enters the unfreeze phase
    assert "resumed from" in log
    end = _last(run_dir)
    assert end["step"] == 2 * STEPS_PER_EPOCH and end["epoch"] == 2
    diffs = [r["ddp/replica_max_abs_diff"] for r in run_metrics(run_dir) if "ddp/replica_max_abs_diff" in r]
    assert len(diffs) >= 2 and max(diffs) == 0.0
    moved = [k for k in mid["model"] if k.startswith("backbone.") and k.endswith("weight")
             and not torch.equal(mid["model"][k], end["model"][k])]
    assert moved, "the backbone did not train after the unfreeze"


@needs_images
@pytest.mark.slow
def test_case11_frozen_bn_statistics_two_ranks(tmp_path, tiny_shards):
    """EfficientNet-Lite0 with its pretrained weights, backbone frozen, 2 ranks through the real trainer:
    every BN running mean / var (and the whole backbone) in the saved checkpoint equals the pretrained
    values after training, across an epoch boundary (each epoch re-enters model.train())."""
    run_dir, _ = _train(tmp_path, tiny_shards, "case11", {
        "model": {"backbone": LITE0_BACKBONE, "weights": "package:efficientnet-lite0"},
        "finetune": {"freeze": "backbone"}}, **{"train.max_steps": STEPS_PER_EPOCH + 2})
    state = _last(run_dir)
    assert state["epoch"] == 1 and state["step"] == STEPS_PER_EPOCH + 2
    pretrained, _ = build_model(LITE0_BACKBONE, 2, "package:efficientnet-lite0")
    ref = pretrained.state_dict()
    bn = _bn_buffers(ref)
    assert len(bn) > 100 and any(v.abs().sum() > 0 for k, v in bn.items() if k.endswith("running_mean"))
    for k in bn:
        assert torch.equal(state["model"][k], ref[k]), k
    for k, v in ref.items():
        if k.startswith("backbone."):
            assert torch.equal(state["model"][k], v), k
    assert not torch.equal(state["model"]["head.weight"], ref["head.weight"])


# ---------------------------------------------------------------------------------------------
# frozen parts cost no backward compute (in-process)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0", LITE0_BACKBONE])
def test_frozen_backbone_builds_no_autograd_graph(backbone):
    """Backbone frozen entirely: its output has no grad_fn (no graph is recorded through it, so
    backward stops at the head); only the head gets gradients."""
    torch.manual_seed(0)
    model, _ = build_model(backbone, 3, "none")
    layer_of, n = layer_ids(model, backbone)
    apply_phase(model, layer_of, n, Phase(0, "head"))
    assert frozen_entirely(model)
    model.train()
    x = torch.rand(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.grad_fn is None and not feats.requires_grad
    loss = torch.nn.functional.cross_entropy(model.head(feats), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None


def test_partial_unfreeze_stops_backward_at_first_trainable_layer():
    """ResNet-18 with layer3, layer4 and the head trainable: the output of layer2 (and everything
    before it) carries no graph, so no gradient is computed for the stem, layer1 and layer2; with the
    ``affine`` BN policy only the BN scale/shift of frozen layers get gradients, not their convs."""
    torch.manual_seed(0)
    model, _ = build_model("resnet18", 3, "none")
    layer_of, n = layer_ids(model, "resnet18")
    apply_phase(model, layer_of, n, Phase(0, 2))
    outputs = {}
    for name in ("layer2", "layer3"):
        getattr(model.backbone, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    model.train()
    torch.nn.functional.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
    assert outputs["layer2"].grad_fn is None and outputs["layer3"].grad_fn is not None
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (layer_of[name] >= 3), name

    model.zero_grad(set_to_none=True)
    apply_phase(model, layer_of, n, Phase(0, "head"), frozen_bn="affine")
    torch.nn.functional.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.tensor([0, 1])).backward()
    bn_params = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, _BatchNorm)
                 for pn, _ in m.named_parameters(recurse=False)}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in bn_params or name.startswith("head.")), name
