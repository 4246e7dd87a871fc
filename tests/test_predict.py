"""launch/predict.py: top-k output and horizontal-flip test-time augmentation."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from helpers.realdata import HYMENOPTERA

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers.inprocess import make_checkpoint

    root = tmp_path_factory.mktemp("pred")
    for c in ("ants", "bees"):
        (root / "images" / c).mkdir(parents=True)
        for p in sorted((HYMENOPTERA / "val" / c).glob("*.jpg"))[:3]:
            shutil.copy(p, root / "images" / c / p.name)
    (root / "images/bees/broken.jpg").write_bytes(b"not an image")
    return root, make_checkpoint(root / "best")


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_topk_columns_and_tta_average(setup):
    from launch.predict import main, predict_logits

    from trainer.data.decode import decode_image_bytes
    from trainer.data.transforms import build_transforms
    from trainer.checkpoint.inference import load_for_inference

    root, ckpt = setup
    acc = main(str(ckpt), str(root / "images"), out=str(root / "plain.csv"), topk=2, precision="fp32")
    main(str(ckpt), str(root / "images"), out=str(root / "tta.csv"), topk=2, tta=True, batch_size=4,
         precision="fp32")
    plain, tta = read(root / "plain.csv"), read(root / "tta.csv")
    assert len(plain) == len(tta) == 7
    broken = [r for r in plain if r["path"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["pred"] == "" and broken[0]["true"] == "bees"
    good = [r for r in plain if r["pred"]]
    assert acc == pytest.approx(sum(r["true"] == r["pred"] for r in good) / len(good))  # readable images only
    for r in good:
        p = {c: float(r[f"p_{c}"]) for c in ("ants", "bees")}
        assert sum(p.values()) == pytest.approx(1.0, abs=2e-6)
        assert r["top1"] == r["pred"] and r["top2"] != r["top1"] and {r["top1"], r["top2"]} == set(p)
        assert float(r["prob1"]) == float(r["prob"]) == pytest.approx(p[r["top1"]], abs=1e-6)
        assert float(r["prob1"]) >= float(r["prob2"]) == pytest.approx(p[r["top2"]], abs=1e-6)

    # --tta = mean of the softmax of the image and of its mirror image
    model, pre, classes = load_for_inference(ckpt)
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    rows = [r for r in tta if r["pred"]]
    imgs = torch.stack([tf(decode_image_bytes(Path(r["path"]).read_bytes())) for r in rows])
    with torch.no_grad():
        x = (imgs.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
        expected = (model(x).softmax(1) + model(x.flip(3)).softmax(1)) / 2
    got = torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    assert not torch.allclose(got, torch.tensor([[float(r[f"p_{c}"]) for c in classes]
                                                 for r in plain if r["pred"]]), atol=1e-4)
    # and it is mirror-invariant: an image and its mirror get the same TTA probabilities
    torch.testing.assert_close(predict_logits(model, imgs, tta=True),
                               predict_logits(model, imgs.flip(3), tta=True), atol=1e-6, rtol=0)


def test_precision_auto_follows_the_hardware_and_bf16_keeps_the_classes(setup, monkeypatch):
    from launch import predict

    import trainer.config.launcher as launcher
    from trainer.config.fields import ConfigError

    monkeypatch.setattr(launcher, "cpu_flags", lambda *a: frozenset({"avx2", "avx512_bf16"}))
    assert predict.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(launcher, "cpu_flags", lambda *a: frozenset({"avx2", "fma"}))
    assert predict.resolve_precision("auto", "cpu") == "fp32"
    assert predict.resolve_precision("bf16", "cpu") == "bf16" and predict.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="--precision"):
        predict.resolve_precision("fp16", "cpu")

    root, ckpt = setup
    predict.main(str(ckpt), str(root / "images"), out=str(root / "p32.csv"), precision="fp32")
    predict.main(str(ckpt), str(root / "images"), out=str(root / "p16.csv"), precision="bf16")
    fp32, bf16 = read(root / "p32.csv"), read(root / "p16.csv")
    assert [r["path"] for r in fp32] == [r["path"] for r in bf16]
    probs32 = [float(r["prob"]) for r in fp32 if r["pred"]]
    probs16 = [float(r["prob"]) for r in bf16 if r["pred"]]
    assert len(probs32) == 6 and probs32 != probs16  # bf16 really ran
    assert max(abs(a - b) for a, b in zip(probs32, probs16)) < 0.05


def test_topk_is_clamped_to_the_class_count(setup):
    from launch.predict import main

    root, ckpt = setup
    main(str(ckpt), str(root / "images/ants"), out=str(root / "k5.csv"), topk=5)
    rows = read(root / "k5.csv")
    assert len(rows) == 3 and "top2" in rows[0] and "top3" not in rows[0]
