"""Recipe mechanics: augmentation options, batch mixing, EMA, the linear probe, image size, strategies."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config.loading import load_config
from trainer.config.schema import ConfigError
from trainer.data.batch_augment import BatchAugment
from trainer.data.transforms import RandomResizedCropFlip, build_transforms
from trainer.finetune.losses import build_criterion
from trainer.train.ema import ModelEma, choose
from trainer.finetune.linear_probe import fit_linear_probe

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("override, key", [
    ({"data.crop_scale": [0.5, 0.2]}, "data.crop_scale"),
    ({"data.crop_scale": [0.0, 1.0]}, "data.crop_scale"),
    ({"data.image_size": 8}, "data.image_size"),
    ({"data.auto_augment": "autoaugment"}, "data.auto_augment"),
    ({"data.auto_augment_magnitude": 31}, "data.auto_augment_magnitude"),
    ({"data.random_erasing": 1.5}, "data.random_erasing"),
    ({"data.mixup_alpha": -0.1}, "data.mixup_alpha"),
    ({"data.mixup_alpha": 0.2, "train.micro_batch_size": 3, "train.global_batch_size": 9}, "micro_batch_size"),
    ({"data.cutmix_alpha": 1.0, "optim.class_weights": "inverse"}, "optim.class_weights"),
    ({"model.drop_path_rate": 1.0}, "model.drop_path_rate"),
    ({"model.drop_path_rate": 0.1, "model.backbone": "resnet18"}, "model.drop_path_rate"),
    ({"train.ema_decay": 1.0}, "train.ema_decay"),
    ({"finetune.lp_l2_grid": [1e-3, 0]}, "finetune.lp_l2_grid"),
    ({"finetune.lp_max_iter": 5}, "finetune.lp_max_iter"),
    ({"finetune.strategy": "linear_probe", "finetune.freeze": "none"}, "finetune.strategy"),
    ({"finetune.strategy": "lp_ft", "train.feature_cache": True, "data.augment": "none"}, "train.feature_cache"),
])
def test_bad_recipe_fields_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_recipe_fields_load_from_the_command_line():
    cfg = load_config(None, {"data.crop_scale": "[0.25, 1]", "data.image_size": "128",
                             "finetune.strategy": "lp_ft", "train.ema_decay": "0.999"})
    assert cfg.data.crop_scale == [0.25, 1.0] and cfg.data.image_size == 128
    assert cfg.finetune.strategy == "lp_ft" and cfg.train.ema_decay == 0.999


# ---------------------------------------------------------------------------------------------
# transforms


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_eval_transform_upsamples_a_small_image_whole():
    # a 64x64 image (EuroSAT) at 224: resized to 256 then centre-cropped, never padded around a 64 px window
    img = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    img[:, :8, :] = 10  # a dark top band of 1/8 of the height
    out = build_transforms(224, train=False, crop_pct=0.875, interpolation="bicubic")(img)
    assert out.shape == (3, 224, 224)
    # 256 px after resizing: band = 32 rows, crop starts at row 16 -> about 16 dark rows, none elsewhere
    dark_rows = (out[0].float().mean(1) < 100).sum().item()
    assert 14 <= dark_rows <= 18
    assert (out[:, 40:, :] > 150).all()  # no zero padding anywhere


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_auto_augment_policy_runs_on_the_uint8_crop(policy):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    tf = build_transforms(32, train=True, auto_augment=policy, auto_augment_magnitude=15, scale=(0.5, 1.0))
    plain = build_transforms(32, train=True, scale=(0.5, 1.0))
    assert isinstance(tf, RandomResizedCropFlip) and tf.policy is not None and plain.policy is None
    data = _jpeg(arr)
    outs, differs = [], 0
    for seed in range(8):
        torch.manual_seed(seed)
        a = tf.from_bytes(data)
        torch.manual_seed(seed)
        b = plain.from_bytes(data)
        assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
        differs += int(not torch.equal(a, b))
        outs.append(a)
    assert differs >= 6  # the policy changed (almost) every crop; 'Identity' may be drawn now and then
    torch.manual_seed(3)
    assert torch.equal(tf.from_bytes(data), outs[3])  # reproducible from the RNG state


def test_crop_scale_reaches_the_crop():
    tf = build_transforms(32, train=True, scale=(0.25, 1.0))
    assert tf.scale == [0.25, 1.0]
    with pytest.raises(ValueError, match="auto_augment"):
        build_transforms(32, train=True, auto_augment="bogus")


# ---------------------------------------------------------------------------------------------
# batch augmentation + loss


def test_mixup_gives_soft_targets_with_label_smoothing_and_a_soft_loss():
    np.random.seed(0)
    aug = BatchAugment(4, mixup_alpha=0.4, label_smoothing=0.1)
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    xm, t = aug(x.clone(), y)
    assert aug.soft_targets and t.shape == (6, 4)
    assert torch.allclose(t.sum(1), torch.ones(6))
    assert (t >= 0.1 / 4 - 1e-6).all()  # smoothing floor: every class keeps at least eps / C
    lam = (xm[0] - x[-1]).flatten().dot((x[0] - x[-1]).flatten()) / (x[0] - x[-1]).pow(2).sum()
    assert 0.0 <= lam.item() <= 1.0 and not torch.allclose(xm, x)  # a convex mix with the reversed batch
    with pytest.raises(ValueError, match="even"):
        aug(torch.randn(5, 3, 8, 8), torch.zeros(5, dtype=torch.long))
    cfg = load_config(None, {"data.mixup_alpha": 0.4})
    crit = build_criterion(cfg.optim, None, soft_targets=True)
    logits = torch.randn(6, 4)
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert torch.allclose(crit(logits, onehot), torch.nn.functional.cross_entropy(logits, y), atol=1e-6)


def test_random_erasing_changes_a_rectangle_per_image():
    torch.manual_seed(0)
    aug = BatchAugment(3, random_erasing=1.0)
    x = torch.zeros(4, 3, 16, 16)
    xe, y = aug(x.clone(), torch.tensor([0, 1, 2, 0]))
    assert not aug.soft_targets and y.tolist() == [0, 1, 2, 0]
    changed = (xe != 0).any(1)  # (B, H, W) erased pixels
    for b in range(4):
        area = changed[b].float().mean().item()
        assert 0.01 < area <= 0.34  # 2-33% of the image
        rows, cols = changed[b].any(1).nonzero(), changed[b].any(0).nonzero()
        assert changed[b].sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_follows_the_warmup_decay_and_round_trips():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, step=1)  # decay 0 at the first step: a copy
    assert torch.allclose(ema.module[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, step=3)  # decay_t = 1 - (1 + 2) ** (-2/3) = 0.4807...
    d = 1 - 3 ** (-2 / 3)
    assert torch.allclose(ema.module[0].weight, d * (model[0].weight - 1) + (1 - d) * model[0].weight)
    ema.update(model, step=10_000)  # capped at decay 0.9
    other = ModelEma(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ema.state_dict().values()))
    assert not torch.equal(start["0.weight"], ema.state_dict()["0.weight"])
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEma(model, decay=1.0)


def test_choose_takes_the_better_of_raw_and_ema():
    raw, ema = {"val/top1": 0.9, "val/loss": 0.3}, {"val/top1": 0.95, "val/loss": 0.35}
    assert choose(raw, ema, "val/top1", "max")[0] == "ema"
    assert choose(raw, ema, "val/loss", "min")[0] == "raw"
    assert choose(raw, {"val/top1": 0.9}, "val/top1", "max")[0] == "raw"  # ties: raw
    assert choose(raw, None, "val/top1", "max") == ("raw", raw)


# ---------------------------------------------------------------------------------------------
# linear probe


def _blobs(n: int, seed: int, shift: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.randn(3, 20, generator=torch.Generator().manual_seed(99)) * 1.5
    x = centres[y] + torch.randn(n, 20, generator=g)
    return x * 7.0 + shift, y  # large, shifted raw scale: the standardisation must be folded back


def test_linear_probe_converges_and_folds_the_standardisation():
    shift = torch.linspace(-50, 50, 20)
    xt, yt = _blobs(300, 0, shift)
    xv, yv = _blobs(150, 1, shift)
    res = fit_linear_probe(xt, yt, xv, yv, num_classes=3, l2_grid=[1e-4, 1e-2, 1.0], max_iter=200)
    assert [r["l2"] for r in res.grid] == [1.0, 1e-2, 1e-4]  # strongest first, warm-started downwards
    best = max(res.grid, key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert res.l2 == best["l2"] and res.val_top1 == best["val_top1"]
    logits = xv @ res.weight.T + res.bias  # the returned head works on raw features
    assert ((logits.argmax(1) == yv).double().mean().item()) == pytest.approx(res.val_top1)
    assert res.val_top1 > 0.9
    # optimality: the gradient of the regularised objective vanishes at the solution (standardised space)
    mu, sd = xt.double().mean(0), xt.double().std(0)
    w = (res.weight.double() * sd).requires_grad_(True)
    b = (res.bias.double() + res.weight.double() @ mu).requires_grad_(True)
    z = (xt.double() - mu) / sd
    loss = torch.nn.functional.cross_entropy(z @ w.T + b, yt) + 0.5 * res.l2 * (w * w).sum()
    loss.backward()
    assert w.grad.abs().max().item() < 1e-3 and b.grad.abs().max().item() < 1e-3


def test_linear_probe_rejects_bad_input():
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="lp_l2_grid"):
        fit_linear_probe(x, y, x, y, num_classes=2, l2_grid=[0.0])
    with pytest.raises(ValueError, match="labels"):
        fit_linear_probe(x, y + 5, x, y, num_classes=2, l2_grid=[1.0])


# ---------------------------------------------------------------------------------------------
# whole runs on a tiny synthetic folder (Lite0 at 32 px)


def _folder(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    colours = {"red": (220, 40, 40), "blue": (40, 40, 220)}
    for split, n in (("train", n_train), ("val", n_val)):
        for k, (cls, c) in enumerate(colours.items()):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng(1000 * k + i + (0 if split == "train" else 500))
                arr = np.clip(np.array(c) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
                (d / f"{cls}_{i}.jpg").write_bytes(_jpeg(arr))
    return root


def _run(tmp: Path, out: str, **ov):
    from trainer.train.start import run

    base = {"data.root": str(tmp / "img"), "data.shard_dir": str(tmp / "shards"), "data.samples_per_shard": 8,
            "data.num_workers": 1, "data.image_size": 32, "train.output_dir": str(tmp / out),
            "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.epochs": 1,
            "train.mixed_precision": "no", "optim.warmup_steps": 0, "logging.wandb": "disabled", "logging.progress": False}
    return run(load_config(REPO / "configs/ants_bees_lite0.yaml", {**base, **ov}))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    _folder(tmp / "img")
    return tmp


@pytest.mark.slow
def test_linear_probe_strategy_writes_a_usable_best_checkpoint(tiny):
    from trainer.checkpoint import inference as infer_ckpt

    res = _run(tiny, "lp", **{"finetune.strategy": "linear_probe", "train.epochs": 3})
    rows = _metrics(tiny / "lp")
    lp = [r for r in rows if "lp/l2" in r]
    evals = [r for r in rows if "val/top1" in r]
    assert len(lp) == 1 and len(evals) == 1 and res.step == 0  # solved, evaluated once, no SGD step
    assert evals[0]["val/top1"] == pytest.approx(lp[0]["lp/val_top1"])  # the folded head in the real pipeline
    assert res.best_top1 == 1.0  # two colours: linearly separable
    model, pre, names = infer_ckpt.load_for_inference(infer_ckpt.best_dir(tiny / "lp"))
    assert pre.input_size == 32 and names == ["blue", "red"]  # data.image_size is what predict uses
    again = _run(tiny, "lp", **{"finetune.strategy": "linear_probe", "train.epochs": 3})  # resumed: done
    assert again.step == 0 and len([r for r in _metrics(tiny / "lp") if "lp/l2" in r]) == 1


@pytest.mark.slow
def test_lp_ft_with_every_augmentation_and_ema_resumes_the_ema(tiny):
    from trainer.checkpoint import state as ckpt_lib
    from trainer.checkpoint import inference as infer_ckpt

    ov = {"finetune.strategy": "lp_ft", "finetune.freeze": "none", "train.ema_decay": 0.99,
          "data.augment": "standard", "data.auto_augment": "randaugment", "data.random_erasing": 0.5,
          "data.mixup_alpha": 0.4, "data.cutmix_alpha": 1.0, "data.crop_scale": [0.3, 1.0],
          "optim.label_smoothing": 0.1, "model.drop_path_rate": 0.1, "optim.lr": 1e-4, "finetune.l2_sp": 100.0}
    _run(tiny, "lpft", **ov)
    rows = _metrics(tiny / "lpft")
    assert any("lp/l2" in r for r in rows)
    ev = [r for r in rows if "val/top1" in r]
    # the probe is evaluated first (step 0, a candidate for best), then the fine-tuned epoch
    assert [r["step"] for r in ev] == [0, ev[1]["step"]] and ev[1]["step"] > 0
    assert ev[0]["val_ema/top1"] == ev[0]["val/top1"]  # the EMA starts as the probe's weights
    assert "val_ema/top1" in ev[1] and "val_ema/loss" in ev[1]
    best = infer_ckpt.read_model_meta(infer_ckpt.best_dir(tiny / "lpft"))
    assert best["metrics"]["weights"] in ("raw", "ema")
    last = ckpt_lib.load(tiny / "lpft/checkpoints/last.pt")
    assert last["ema"] is not None and set(last["ema"]) == set(last["model"])
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"]
               if last["model"][k].is_floating_point())
    # resume for one more epoch: the EMA continues from the saved one (not from the weights)
    from trainer.train.trainer import Trainer

    cfg = load_config(REPO / "configs/ants_bees_lite0.yaml", {
        **ov, "data.root": str(tiny / "img"), "data.shard_dir": str(tiny / "shards"), "data.samples_per_shard": 8,
        "data.num_workers": 1, "data.image_size": 32, "train.output_dir": str(tiny / "lpft"),
        "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.epochs": 2, "optim.warmup_steps": 0,
        "train.mixed_precision": "no",
        "logging.wandb": "disabled", "logging.progress": False})
    t = Trainer(cfg)
    assert all(torch.equal(t.ema.state_dict()[k], last["ema"][k]) for k in last["ema"])
    # L2-SP still pulls toward the pretrained weights, not toward the resumed checkpoint's
    from trainer.models.build import build_model

    pretrained = build_model(cfg.model.backbone, 2, cfg.model.weights)[0].state_dict()
    starts = {t.param_names[id(p)]: p0 for _, params, p0s in t.l2_sp.covered for p, p0 in zip(params, p0s)}
    assert len(starts) > 10 and all(torch.equal(p0, pretrained[n]) for n, p0 in starts.items())
    assert any(not torch.equal(p0, last["model"][n]) for n, p0 in starts.items())
    t.tracker.close()
