"""trainer/data/transforms.py: the fused decode + RandomResizedCrop training transform.

Checks that ``RandomResizedCropFlip`` is the torchvision pipeline it replaces (exactly, on the
same RNG state), that reduced-size JPEG decoding happens when the crop allows it and stays close to
the full-size result, that EXIF orientation matches torchvision's, and that every other input takes
the plain decode path (including the errors it raises)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import trainer.data.transforms as T
from trainer.data.decode import (
    ImageDecodeError,
    apply_orientation,
    decode_image_bytes,
    jpeg_exif_orientation,
)
from trainer.data.transforms import RandomResizedCropFlip, build_transforms

from tests.helpers.realdata import HYMENOPTERA


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: smooth colour gradients plus noise (JPEG-realistic, not flat)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, subsampling: int = 0, orientation: int | None = None, mode: str = "RGB") -> bytes:
    img = Image.fromarray(arr).convert(mode)
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, subsampling=subsampling, **kw)
    return buf.getvalue()


def reference_pipeline(size: int) -> v2.Compose:
    """What RandomResizedCropFlip stands for: torchvision's own RRC + flip."""
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def sample_files() -> list[bytes]:
    files = [jpeg(textured(120, 160, 1)), jpeg(textured(90, 70, 2), subsampling=2),
             jpeg(textured(64, 64, 3), mode="L")]
    real = sorted(p for p in (HYMENOPTERA / "train" / "bees").glob("*") if p.is_file())[:6]
    return files + [p.read_bytes() for p in real]


def test_same_output_as_torchvision_pipeline_for_the_same_rng_state():
    """Full-size decode + the tensor path both equal v2.RandomResizedCrop + v2.RandomHorizontalFlip."""
    fused = RandomResizedCropFlip(48, dct_scaling=False, fast_dct=False)
    ref = reference_pipeline(48)
    for i, data in enumerate(sample_files()):
        decoded = decode_image_bytes(data)
        for seed in (i, 100 + i):
            torch.manual_seed(seed)
            expected = ref(decoded)
            torch.manual_seed(seed)
            from_tensor = fused(decoded)
            torch.manual_seed(seed)
            from_bytes = fused.from_bytes(data)
            assert from_bytes.shape == (3, 48, 48) and from_bytes.dtype == torch.uint8
            assert torch.equal(from_tensor, expected), f"sample {i} seed {seed}: tensor path differs"
            assert torch.equal(from_bytes, expected), f"sample {i} seed {seed}: fused decode differs"


def test_build_transforms_training_transform_is_the_fused_one():
    tf = build_transforms(32, train=True, interpolation="bicubic", scale=(0.5, 1.0))
    assert isinstance(tf, RandomResizedCropFlip) and tf.fast_dct and tf.dct_scaling
    assert tf.scale == [0.5, 1.0] and tf.interpolation == v2.InterpolationMode.BICUBIC
    assert not hasattr(build_transforms(32, train=False), "from_bytes")
    assert not hasattr(build_transforms(32, train=True, augment="none"), "from_bytes")


def test_reduced_size_decode_when_the_crop_allows(monkeypatch):
    data = jpeg(textured(960, 1280))
    shapes = []
    real_decode = T.simplejpeg.decode_jpeg

    def spy(*args, **kw):
        out = real_decode(*args, **kw)
        shapes.append(out.shape[:2])
        return out

    monkeypatch.setattr(T.simplejpeg, "decode_jpeg", spy)
    # crop >= 90% of the area (>= 911 x 911 px) for a 224 output: 1/4 scale keeps >= 224 px
    scaled = RandomResizedCropFlip(224, scale=(0.9, 1.0), fast_dct=False)
    full = RandomResizedCropFlip(224, scale=(0.9, 1.0), fast_dct=False, dct_scaling=False)
    for seed in range(4):
        torch.manual_seed(seed)
        a = scaled.from_bytes(data)
        torch.manual_seed(seed)
        b = full.from_bytes(data)
        assert a.shape == b.shape == (3, 224, 224)
        diff = (a.float() - b.float()).abs()
        assert diff.mean() < 3.0, f"seed {seed}: reduced-size decode strays from full size ({diff.mean():.2f})"
    assert shapes[0::2] == [(240, 320)] * 4  # 1/4 scale with DCT scaling
    assert shapes[1::2] == [(960, 1280)] * 4
    # a small crop needs every pixel: full-size decode
    shapes.clear()
    RandomResizedCropFlip(224, scale=(0.05, 0.06)).from_bytes(data)
    assert shapes == [(960, 1280)]
    # fast_dct changes pixel values by a few levels at most
    torch.manual_seed(0)
    fast = RandomResizedCropFlip(224, scale=(0.9, 1.0), fast_dct=True).from_bytes(data)
    torch.manual_seed(0)
    accurate = scaled.from_bytes(data)
    assert (fast.float() - accurate.float()).abs().mean() < 2.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_torchvision(orientation):
    arr = np.zeros((40, 60, 3), np.uint8)  # four flat quadrants: any wrong turn or flip is obvious
    arr[:20, :30] = (250, 20, 20)
    arr[:20, 30:] = (20, 250, 20)
    arr[20:, :30] = (20, 20, 250)
    arr[20:, 30:] = (240, 240, 30)
    data = jpeg(arr, orientation=orientation)
    assert jpeg_exif_orientation(data) == orientation
    # the whole stored image as the crop (area 1, its own aspect ratio), no flip, full-size decode
    tf = RandomResizedCropFlip(16, scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip_p=0.0, dct_scaling=False,
                               fast_dct=False)
    out = tf.from_bytes(data)
    upright = decode_image_bytes(data)  # torchvision's apply_exif_orientation
    assert upright.shape[1:] == ((40, 60) if orientation <= 4 else (60, 40))
    ref = TF.resize(upright, [16, 16], antialias=True)
    diff = (out.int() - ref.int()).abs()
    assert diff.float().mean() < 2.0 and diff.max() <= 40, f"orientation {orientation}: max diff {diff.max()}"


def test_apply_orientation_round_trip_shapes():
    img = torch.arange(2 * 3 * 5).view(1, 2, 3, 5)
    for o in range(1, 9):
        assert apply_orientation(img, o).shape[-2:] == ((3, 5) if o <= 4 else (5, 3))
    assert apply_orientation(img, 1) is img


def test_exif_parsing_tolerates_junk():
    plain = jpeg(textured(16, 16))
    assert jpeg_exif_orientation(plain) == 1
    assert jpeg_exif_orientation(b"") == 1 and jpeg_exif_orientation(b"\xff\xd8") == 1
    broken = plain[:2] + b"\xff\xe1\x00\x10Exif\x00\x00garbage!" + plain[2:]  # malformed APP1
    assert jpeg_exif_orientation(broken) == 1


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_other_inputs_take_the_plain_path():
    tf = RandomResizedCropFlip(24)
    rgb = Image.fromarray(textured(50, 40))
    for data in (jpeg(textured(50, 40)), _encode(rgb.convert("CMYK"), "JPEG"), _encode(rgb, "PNG"),
                 _encode(rgb.convert("P"), "GIF"), jpeg(textured(50, 40), mode="L")):
        out = tf.from_bytes(data)
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    gray = tf.from_bytes(jpeg(textured(50, 40), mode="L"))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    good = jpeg(textured(50, 40))
    for bad in (good[: len(good) // 2], b"\xff\xd8\xff" + b"\x00" * 50, b""):
        with pytest.raises(ImageDecodeError):
            tf.from_bytes(bad)
