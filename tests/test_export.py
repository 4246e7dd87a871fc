"""launch/export.py: TorchScript and ONNX give the same logits as PyTorch on real images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.realdata import HYMENOPTERA

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")]


def real_images():
    """Two ants and two bees of the val split, decoded."""
    from trainer.data.decode import decode_image_bytes

    paths = [p for c in ("ants", "bees") for p in sorted((HYMENOPTERA / "val" / c).glob("*.jpg"))[:2]]
    return [decode_image_bytes(p.read_bytes()) for p in paths]


def test_torchscript_and_onnx_match_pytorch_on_real_images(tmp_path):
    import onnxruntime as ort
    from launch.export import export
    from helpers.inprocess import make_checkpoint
    from torchvision.transforms import v2

    from trainer.data.transforms import build_transforms
    from trainer.checkpoint.inference import load_for_inference

    ckpt = make_checkpoint(tmp_path / "run/checkpoints/best")
    result = export(str(ckpt))  # default out_dir: <run>/export
    out = tmp_path / "run/export"
    assert result["onnx"] == out / "model.onnx" and result["torchscript"] == out / "model.torchscript.pt"
    assert max(result["max_abs_diff"].values()) < 1e-3

    model, pre, classes = load_for_inference(ckpt)
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    raw = real_images()
    x = model.normalize(torch.stack([tf(img) for img in raw]))  # (4, 3, 224, 224) float32, what the export takes
    with torch.no_grad():
        ref = model(x)
        ts = torch.jit.load(str(out / "model.torchscript.pt"))(x)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx = torch.from_numpy(sess.run(["logits"], {"images": x.numpy()})[0])  # batch 4 (exported with 1)
    assert ref.shape == (4, 2) and ref.abs().max() > 0.1
    torch.testing.assert_close(ts, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(onnx, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(onnx.argmax(1), ref.argmax(1))

    # preprocessing.json alone is enough to feed the exported model: rebuild the input from it
    spec = json.loads((out / "preprocessing.json").read_text())
    assert spec["class_names"] == classes == ["ants", "bees"] and spec["input_size"] == 224
    assert spec["input"]["name"] == "images" and spec["output"]["name"] == "logits"
    own = v2.Compose([v2.Resize(spec["resize_size"], interpolation=v2.InterpolationMode[spec["interpolation"].upper()],
                                antialias=True), v2.CenterCrop(spec["input_size"]),
                      v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"])])
    x2 = torch.stack([own(img) for img in raw])
    torch.testing.assert_close(x2, x, atol=1e-5, rtol=0)


def test_unknown_format_is_named(tmp_path):
    from launch.export import export

    with pytest.raises(ValueError, match="tflite"):
        export(str(tmp_path / "best.pt"), formats="onnx,tflite")
