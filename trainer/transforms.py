"""Image decoding, train/eval transforms and on-device normalization.

Data contract (every loader in :mod:`trainer.data` follows it):

* :func:`decode_image_bytes` turns the encoded bytes of one sample into an RGB ``uint8`` tensor
  ``(3, H, W)``, whatever the colour mode of the file.
* :func:`build_transforms` returns a ``torchvision.transforms.v2`` pipeline ``(3, H, W) uint8 ->
  (3, S, S) uint8`` (crop, resize, flip). It runs in the loader workers, on the CPU.
* :func:`normalize` turns a batch ``(B, 3, S, S) uint8`` into ``float32`` ``(x / 255 - mean) / std``.
  It runs on the device in the training loop, so the loader ships 4x fewer bytes (uint8 instead of
  float32) to the accelerator.

Decoding (fast path first, PIL for the rest):

* JPEG: ``torchvision.io.decode_jpeg(mode=RGB)`` (libjpeg-turbo; also converts CMYK/YCCK and
  grayscale to RGB). A truncated JPEG is an error (both libjpeg-turbo and PIL reject it).
* PNG, WebP: ``torchvision.io.decode_image(mode=RGB_ALPHA)``; 16-bit images are scaled to 8 bits
  (``to_dtype(scale=True)``), transparency is composited over :data:`TRANSPARENCY_BACKGROUND`.
* GIF and everything else (BMP, TIFF, ...), and any file torchvision rejects: PIL. GIF goes to PIL
  because torchvision's GIF decoder ignores the transparent colour index. Palette/LA/RGBA/PA images
  are composited over the background, 16-bit grayscale (``I;16``) is scaled by ``>> 8``, the first
  frame of an animation is used.
* EXIF orientation is applied in both paths (``apply_exif_orientation`` / ``ImageOps.exif_transpose``)
  so a phone photo looks the same to the model as in an image viewer.

torchvision 0.29 marks ``torchvision.io`` decoding as deprecated in favour of TorchCodec (each call
emits a DeprecationWarning, hidden by default outside ``__main__``); it is still the fastest
installed CPU decoder here. Swapping in TorchCodec later only touches :func:`decode_image_bytes`.

Transparent pixels are composited over white, ``(255, 255, 255)``: the background most transparent
product/logo images are designed for, and what a browser shows. It is fixed (not random) so the
eval transform stays deterministic.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

TRANSPARENCY_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""RGB colour (0-255) that transparent pixels are composited over (white)."""

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
_AUGMENTS = ("standard", "none")


class ImageDecodeError(ValueError):
    """The bytes of a sample are not a decodable image (empty, truncated, unknown format)."""


def _sniff_format(data: bytes) -> str:
    """Format from the magic bytes: 'jpeg', 'png', 'gif', 'webp' or 'other'."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "other"


def _composite_rgba(img: torch.Tensor, background: Sequence[int]) -> torch.Tensor:
    """(4, H, W) uint8 RGBA -> (3, H, W) uint8 RGB, alpha-composited over ``background`` (0-255)."""
    alpha = img[3:4]
    if bool((alpha == 255).all()):
        return img[:3].contiguous()
    a = alpha.to(torch.int32)
    bg = torch.tensor(background, dtype=torch.int32).view(3, 1, 1)
    rgb = (img[:3].to(torch.int32) * a + bg * (255 - a) + 127) // 255
    return rgb.to(torch.uint8)


def _decode_pil(data: bytes, background: Sequence[int]) -> torch.Tensor:
    """PIL decode of any format PIL knows -> (3, H, W) uint8 RGB. Raises OSError/ValueError on bad data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises OSError on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            arr = np.asarray(im).astype(np.int64)
            arr = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        elif im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (*background, 255))
            arr = np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
        else:
            arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def decode_image_bytes(data: bytes, *, background: Sequence[int] = TRANSPARENCY_BACKGROUND) -> torch.Tensor:
    """Decode one encoded image to RGB.

    Args:
        data: the encoded file bytes (JPEG, PNG, GIF, WebP, or any format PIL reads).
        background: RGB (0-255) that transparency is composited over; default white.

    Returns:
        ``(3, H, W)`` ``uint8`` RGB tensor (contiguous, CPU).

    Raises:
        ImageDecodeError: empty, truncated or unrecognised data; the message holds the reasons given
            by torchvision and PIL.

    Fast path: torchvision's libjpeg-turbo/libpng/libwebp decoders (about 1.5x faster than PIL on
    the ants/bees JPEGs); PIL handles the rest, see the module docstring.
    """
    if not data:
        raise ImageDecodeError("empty image data (0 bytes)")
    fmt = _sniff_format(data)
    tv_error = None
    if fmt in ("jpeg", "png", "webp"):
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            if fmt == "jpeg":
                return decode_jpeg(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            img = decode_image(buf, mode=ImageReadMode.RGB_ALPHA, apply_exif_orientation=True)
            if img.dtype != torch.uint8:  # 16-bit PNG
                img = TF.to_dtype(img, torch.uint8, scale=True)
            return _composite_rgba(img, background)
        except RuntimeError as exn:  # e.g. truncated data, 12-bit JPEG: let PIL try, keep the reason
            tv_error = str(exn).strip().splitlines()[-1]
    try:
        return _decode_pil(data, background)
    except Exception as exn:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = f"{type(exn).__name__}: {exn}"
        if tv_error:
            reason = f"torchvision: {tv_error}; PIL: {reason}"
        raise ImageDecodeError(f"cannot decode {fmt} image ({len(data)} bytes): {reason}") from None


def build_transforms(input_size: int, *, train: bool, crop_pct: float = 0.875,
                     interpolation: str = "bilinear", augment: str = "standard",
                     scale: tuple[float, float] = (0.08, 1.0)) -> Callable[[torch.Tensor], torch.Tensor]:
    """Train or eval transform, ``(3, H, W) uint8 -> (3, S, S) uint8`` with ``S = input_size``.

    Args:
        input_size: output side S in pixels (the backbone's input size, e.g. 224).
        train: training transform (random) or evaluation transform (deterministic).
        crop_pct: eval only: resize the short side to ``int(S / crop_pct)`` then center-crop S
            (the timm / torchvision-reference convention; 0.875 gives 256 -> 224).
        interpolation: 'bilinear', 'bicubic' or 'nearest' (use the backbone's pretrained setting).
        augment: training only: 'standard' = RandomResizedCrop(S, scale, ratio=(3/4, 4/3)) +
            RandomHorizontalFlip (the ImageNet-reference augmentation, Szegedy et al. 2015);
            'none' = the deterministic eval transform (for feature caching / feature extraction).
        scale: RandomResizedCrop area range (fraction of the image), torchvision default (0.08, 1).

    Returns:
        a ``torchvision.transforms.v2.Compose``; random ops draw from torch's global RNG (the loaders
        in :mod:`trainer.data` seed and scope it per worker).

    Raises:
        ValueError: a bad ``input_size``, ``crop_pct``, ``interpolation`` or ``augment`` (named).
    """
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"build_transforms: input_size must be a positive int, got {input_size!r}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"build_transforms: crop_pct must be in (0, 1], got {crop_pct!r}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"build_transforms: interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                         f"got {interpolation!r}")
    if augment not in _AUGMENTS:
        raise ValueError(f"build_transforms: augment must be one of {list(_AUGMENTS)}, got {augment!r}")
    mode = _INTERPOLATIONS[interpolation]
    if train and augment == "standard":
        return v2.Compose([
            v2.RandomResizedCrop(input_size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=mode,
                                 antialias=True),
            v2.RandomHorizontalFlip(),
        ])
    return v2.Compose([
        v2.Resize(int(input_size / crop_pct), interpolation=mode, antialias=True),
        v2.CenterCrop(input_size),
    ])


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Scale a uint8 batch to float32 and standardize per channel, on the batch's device.

    Args:
        images: ``(B, 3, H, W)`` ``uint8`` (any memory format; channels_last is kept).
        mean, std: 3 per-channel values in 0-1 units (e.g. timm's ``IMAGENET_DEFAULT_MEAN``
            ``(0.485, 0.456, 0.406)`` / std ``(0.229, 0.224, 0.225)``, from the backbone's config).

    Returns:
        ``(B, 3, H, W)`` ``float32``: ``(images / 255 - mean) / std``.

    Raises:
        ValueError: wrong dtype/shape, mean/std not 3 values, a std of 0, or values in 0-255 units.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize: images must be (B, 3, H, W) uint8, got {tuple(images.shape)} "
                         f"{images.dtype}")
    # checked on the CPU, then copied: floats cause no host-device synchronisation per training step
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).cpu()
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1).cpu()
    if m.numel() != 3 or s.numel() != 3:
        raise ValueError(f"normalize: mean and std need 3 values, got {m.numel()} and {s.numel()}")
    if bool((m > 1.0).any()) or bool((s > 1.0).any()) or bool((s <= 0).any()):
        raise ValueError(f"normalize: mean/std must be in 0-1 units with std > 0 (e.g. 0.485, 0.229), "
                         f"got mean={m.tolist()} std={s.tolist()}")
    m, s = m.to(images.device, non_blocking=True), s.to(images.device, non_blocking=True)
    x = images.to(torch.float32).div_(255.0)
    return x.sub_(m.view(1, 3, 1, 1)).div_(s.view(1, 3, 1, 1))
