"""Image decoding and the data contract of the loaders.

Data contract (every loader in :mod:`trainer.data` follows it):

* :func:`decode_image_bytes` turns the encoded bytes of one sample into an RGB ``uint8`` tensor
  ``(3, H, W)``, whatever the colour mode of the file.
* :func:`build_transforms` returns a ``torchvision.transforms.v2`` pipeline ``(3, H, W) uint8 ->
  (3, S, S) uint8`` (crop, resize, flip). It runs in the loader workers, on the CPU. The training
  transform (:class:`RandomResizedCropFlip`) also has ``from_bytes(data) -> (3, S, S) uint8``, which
  the loaders call instead of decode + transform: it decodes JPEGs at reduced size when the crop
  allows (see "Fused decode" below).
* Batches stay ``(B, 3, S, S) uint8`` up to the model, which normalises them on the device
  (``ImageClassifier.normalize``: ``(x / 255 - mean) / std``), so the loader ships 4x fewer bytes
  (uint8 instead of float32) to the accelerator.

Decoding (fast path first, PIL for the rest):

* JPEG: ``torchvision.io.decode_jpeg(mode=RGB)`` (libjpeg-turbo; also converts CMYK/YCCK and
  grayscale to RGB). A truncated JPEG is an error (both libjpeg-turbo and PIL reject it).
* WebP: ``torchvision.io.decode_image(mode=RGB_ALPHA)``; transparency is composited over
  :data:`TRANSPARENCY_BACKGROUND`.
* PNG, GIF and everything else (BMP, TIFF, ...), and any file torchvision rejects: PIL. GIF goes to PIL
  because torchvision's GIF decoder ignores the transparent colour index; PNG because torchvision 0.29's
  libpng path crashes the process (SIGSEGV) on some corrupt data, where PIL raises.
* Every path first reads the image size from the header and refuses more than
  ``PIL.Image.MAX_IMAGE_PIXELS`` pixels before decoding (:func:`check_pixels`). Palette/LA/RGBA/PA images
  are composited over the background, 16-bit grayscale (``I;16``) is scaled by ``>> 8``, the first
  frame of an animation is used.
* EXIF orientation is applied in both paths (``apply_exif_orientation`` / ``ImageOps.exif_transpose``)
  so a phone photo looks the same to the model as in an image viewer.

torchvision 0.29 marks ``torchvision.io`` decoding as deprecated in favour of TorchCodec (each call
emits a DeprecationWarning, hidden by default outside ``__main__``). TorchCodec 0.17 and simplejpeg
decode JPEGs with the same libjpeg-turbo at the same speed here (1.2-1.3 ms per ants/bees image, PIL
1.7 ms); only simplejpeg exposes DCT scaling, which the fused training path below needs. Swapping in
TorchCodec later only touches :func:`decode_image_bytes`.

Fused decode + RandomResizedCrop (training only). The crop box is drawn from the JPEG header's size
before decoding (the same ``RandomResizedCrop.get_params`` draw as on a decoded image). When the box
is at least ``2k`` times the output side in both directions, the JPEG is decoded at ``1/k`` scale
(k = 2, 4, 8) with libjpeg-turbo's DCT scaling (through ``simplejpeg``), then cropped and resized
with antialiasing to the output size. DCT scaling averages 8x8 blocks in the frequency domain, a
low-pass downscale, so only downscaling happens at every stage, as in Pillow's ``draft`` +
``reducing_gap`` resizing. The idea is NVIDIA DALI's fused ``decoders.image_random_crop``. On large
photos this decodes up to 64x fewer pixels; on images under about twice the output size (most
of ants/bees) it is the plain full-size decode. EXIF orientation is applied to the output
crop: the crop is drawn in the stored orientation, and RandomResizedCrop's distribution (area
uniform, log aspect ratio symmetric about 0, position uniform) is the same under a 90-degree turn.
CMYK/YCCK JPEGs and non-JPEG files take the plain path (:func:`decode_image_bytes` + ``__call__``).

Transparent pixels are composited over white, ``(255, 255, 255)``: the background most transparent
product/logo images are designed for, and what a browser shows. It is fixed (not random) so the
eval transform stays deterministic.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

TRANSPARENCY_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""RGB colour (0-255) that transparent pixels are composited over (white)."""


class ImageDecodeError(ValueError):
    """The bytes of a sample are not a decodable image (empty, truncated, unknown format, too large)."""


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def describe_decode_error(exn: BaseException, data: bytes) -> str:
    """One-line reason for a decoder's exception on ``data``, for messages that name the file or sample
    themselves: ``"<type>: <message>"``; PIL's ``cannot identify image file <_io.BytesIO object at 0x..>``
    becomes ``not a known image format (first bytes b'...')``, and no other object repr is kept."""
    if isinstance(exn, UnidentifiedImageError):
        return f"not a known image format (PIL cannot identify it; first bytes {data[:12]!r})"
    text = " ".join(_OBJECT_REPR.sub("the data", str(exn)).split())
    return f"{type(exn).__name__}: {text}"


def check_pixels(width: int, height: int) -> None:
    """Refuse an image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89,478,485 by default, PIL's own
    decompression-bomb limit, about 9459 x 9459), read from its header before any pixel is decoded: a
    50,000 x 50,000 header would otherwise ask for 7.5 GB. Set ``PIL.Image.MAX_IMAGE_PIXELS`` to change the
    limit (None: no limit). Used by every decoder here and by the shard writer's check.

    Raises:
        ImageDecodeError: naming the size and the limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageDecodeError(f"image is {width} x {height} = {width * height:,} pixels, more than the limit "
                               f"of {int(limit):,} (PIL.Image.MAX_IMAGE_PIXELS); refused before decoding")


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """``(width, height)`` from the header without decoding pixels; None if the header is unreadable."""
    if fmt == "jpeg":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return width, height
        except ValueError:
            return None
    if fmt == "png" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header only
                return im.size
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses at open
        raise ImageDecodeError(f"cannot decode {fmt} image: {e}") from None
    except Exception:  # noqa: BLE001 - unreadable header: the decoders report why
        return None


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
    """PIL decode of any format PIL knows -> (3, H, W) uint8 RGB. Raises OSError/ValueError on bad data,
    ImageDecodeError over the pixel limit (:func:`check_pixels`, before decoding)."""
    with Image.open(io.BytesIO(data)) as im:
        check_pixels(*im.size)
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
        ImageDecodeError: empty, truncated or unrecognised data (the message holds the reasons given
            by torchvision and PIL), or more pixels than :func:`check_pixels` allows (from the header).

    Fast path: torchvision's libjpeg-turbo/libpng/libwebp decoders (about 1.5x faster than PIL on
    the ants/bees JPEGs); PIL handles the rest, see the module docstring.
    """
    if not data:
        raise ImageDecodeError("empty image data (0 bytes)")
    fmt = _sniff_format(data)
    tv_error = None
    size = _header_size(data, fmt)
    if size is not None:
        check_pixels(*size)
    # PNG goes to PIL: torchvision 0.29's libpng path segfaults on some corrupt IDAT streams (found by
    # bench/fuzz.py: "libpng error: IDAT: invalid bit length repeat", then SIGSEGV); PIL raises instead
    # a JPEG header libjpeg-turbo cannot read fails there too, before any allocation; other unreadable
    # headers go to PIL, which checks the size after opening
    if fmt == "jpeg" or (fmt == "webp" and size is not None):
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
    except ImageDecodeError:
        raise
    except Exception as exn:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = describe_decode_error(exn, data)
        if tv_error:
            reason = f"torchvision: {tv_error}; PIL: {reason}"
        raise ImageDecodeError(f"cannot decode {fmt} image ({len(data)} bytes): {reason}") from None


_EXIF_ORIENTATION_TAG = 0x0112
_DCT_SCALE_DENOMINATORS = (8, 4, 2)  # libjpeg-turbo's SIMD-accelerated reduced-size IDCTs (1/8, 1/4, 1/2)


def jpeg_exif_orientation(data: bytes) -> int:
    """EXIF orientation (1-8; 1 = as stored) of a JPEG, from its APP1 segment; 1 when absent or unreadable.

    Walks the JPEG markers up to the first scan (start-of-scan, 0xFFDA) and parses the first
    ``Exif`` APP1 segment with ``PIL.Image.Exif`` (the image data is not read). The values are the
    TIFF/EXIF 2.3 ``Orientation`` tag (0x0112): 2 mirrored, 3 rotated 180, 4 flipped, 5 transposed,
    6 rotated 90 clockwise, 7 transversed, 8 rotated 90 counter-clockwise (to display).
    """
    pos, n = 2, len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA or 0xD0 <= marker <= 0xD9:  # start of scan / restart / end: no more headers
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            exif = Image.Exif()
            try:
                exif.load(data[pos + 4:pos + 2 + length])
                value = int(exif.get(_EXIF_ORIENTATION_TAG, 1))
            except Exception:  # a malformed EXIF block: show the image as stored, like most viewers
                return 1
            return value if 1 <= value <= 8 else 1
        pos += 2 + length
    return 1


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turn/flip an image stored with EXIF ``orientation`` (1-8) to its display orientation.

    Args:
        image: ``(..., H, W)`` tensor.
        orientation: see :func:`jpeg_exif_orientation`; 1 returns ``image`` itself.

    Returns:
        ``(..., H, W)`` (orientations 1-4) or ``(..., W, H)`` (5-8), the same as
        ``PIL.ImageOps.exif_transpose`` and torchvision's ``apply_exif_orientation``.
    """
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image




