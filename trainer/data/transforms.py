"""Train/eval transforms (the fused decode + RandomResizedCrop for training).

See :mod:`trainer.data.decode` for the data contract and the fused decode."""

from __future__ import annotations

import math
from collections.abc import Callable

import simplejpeg
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.data.decode import (
    _DCT_SCALE_DENOMINATORS,
    _sniff_format,
    apply_orientation,
    check_pixels,
    decode_image_bytes,
    jpeg_exif_orientation,
)

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
_AUGMENTS = ("standard", "none")
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")



class RandomResizedCropFlip:
    """Training augmentation: RandomResizedCrop(S) + RandomHorizontalFlip, optionally fused with decoding.

    The ImageNet-reference augmentation (Szegedy et al. 2015, "Going deeper with convolutions"):
    a crop of random area ``scale`` x image area and aspect ratio in ``ratio`` (log-uniform), resized
    to ``S x S`` with antialiasing, mirrored with probability ``hflip_p``. The crop box is drawn by
    ``torchvision.transforms.v2.RandomResizedCrop.get_params`` and the flip by ``torch.rand``, both
    from torch's global RNG, in the same order as ``v2.Compose([v2.RandomResizedCrop(...),
    v2.RandomHorizontalFlip()])``: on a decoded tensor :meth:`__call__` gives that pipeline's exact
    output for the same RNG state.

    Args:
        size: output side S in pixels.
        scale: crop area range as a fraction of the image area.
        ratio: crop aspect-ratio range (width / height).
        interpolation: a ``v2.InterpolationMode``.
        hflip_p: probability of a horizontal flip.
        dct_scaling: let :meth:`from_bytes` decode JPEGs at 1/2, 1/4 or 1/8 size when the crop is at
            least twice the output size (see the module docstring); False decodes at full size.
        fast_dct: libjpeg-turbo's fast integer IDCT (``JDCT_IFAST``) in :meth:`from_bytes`: about
            4% faster decoding, pixel values within a few levels of the accurate IDCT.
        policy: optional ``(3, S, S) uint8 -> (3, S, S) uint8`` applied last to every crop (a
            torchvision v2 ``RandAugment`` / ``TrivialAugmentWide``, see :func:`build_transforms`).
    """

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR, hflip_p: float = 0.5,
                 dct_scaling: bool = True, fast_dct: bool = False, policy: Callable | None = None):
        self.size, self.scale, self.ratio = size, list(scale), list(ratio)
        self.interpolation, self.hflip_p = interpolation, hflip_p
        self.dct_scaling, self.fast_dct = dct_scaling, fast_dct
        self.policy = policy

    def __repr__(self) -> str:
        return (f"RandomResizedCropFlip(size={self.size}, scale={tuple(self.scale)}, "
                f"ratio={tuple(round(r, 4) for r in self.ratio)}, interpolation={self.interpolation.value}, "
                f"hflip_p={self.hflip_p}, dct_scaling={self.dct_scaling}, fast_dct={self.fast_dct}, "
                f"policy={self.policy})")

    def _finish(self, crop: torch.Tensor, orientation: int = 1) -> torch.Tensor:
        # a dense channels-last crop takes torch's vectorised uint8 antialias kernel (about 1.5x faster
        # than on the strided view; same values)
        crop = crop.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        out = TF.resize(crop, [self.size, self.size], interpolation=self.interpolation, antialias=True)
        out = apply_orientation(out, orientation)
        if torch.rand(1).item() < self.hflip_p:
            out = out.flip(-1)
        if self.policy is not None:
            out = self.policy(out)
        return out  # channels-last memory (HWC): the batch collate copies it into (B, 3, S, S) anyway

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: ``(3, H, W)`` uint8 -> ``(3, S, S)`` uint8 (a random crop, resized, maybe mirrored)."""
        i, j, h, w = v2.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        return self._finish(image[..., i:i + h, j:j + w])

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """Decode + augment one encoded image: bytes -> ``(3, S, S)`` uint8 RGB.

        JPEGs (except CMYK/YCCK) are decoded by ``simplejpeg`` (libjpeg-turbo) with the crop box
        drawn from the header first, at reduced size when the box allows; everything else goes
        through :func:`decode_image_bytes` + :meth:`__call__`.

        Raises:
            ImageDecodeError: the bytes are not a decodable image (from :func:`decode_image_bytes`), or the
                header announces more pixels than :func:`~trainer.data.decode.check_pixels` allows.
        """
        if _sniff_format(data) != "jpeg":
            return self(decode_image_bytes(data))
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # not a readable JPEG header: the plain path reports why
            return self(decode_image_bytes(data))
        check_pixels(width, height)
        if colorspace not in ("RGB", "YCbCr", "Gray") or height < 1 or width < 1:
            return self(decode_image_bytes(data))  # CMYK/YCCK: libjpeg-turbo cannot output RGB
        i, j, h, w = v2.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width),
                                                    self.scale, self.ratio)
        k = 1
        if self.dct_scaling:
            k = next((d for d in _DCT_SCALE_DENOMINATORS if h // d >= self.size and w // d >= self.size), 1)
        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=self.fast_dct,
                                         min_height=math.ceil(height / k), min_width=math.ceil(width / k))
        except ValueError:  # truncated or corrupt data: the plain path tries PIL and reports both reasons
            return self(decode_image_bytes(data))
        out_h, out_w = arr.shape[:2]
        fy, fx = out_h / height, out_w / width
        top, left = min(int(i * fy), out_h - 1), min(int(j * fx), out_w - 1)
        bottom = max(top + 1, min(out_h, round((i + h) * fy)))
        right = max(left + 1, min(out_w, round((j + w) * fx)))
        crop = torch.from_numpy(arr[top:bottom, left:right]).permute(2, 0, 1)
        return self._finish(crop, jpeg_exif_orientation(data))


def build_transforms(input_size: int, *, train: bool, crop_pct: float = 0.875,
                     interpolation: str = "bilinear", augment: str = "standard",
                     scale: tuple[float, float] = (0.08, 1.0), auto_augment: str = "none",
                     auto_augment_magnitude: int = 9,
                     auto_augment_ops: int = 2) -> Callable[[torch.Tensor], torch.Tensor]:
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
        auto_augment: training with ``augment='standard'`` only: a policy on the uint8 crop, after
            the flip: 'randaugment' (``v2.RandAugment(num_ops=auto_augment_ops,
            magnitude=auto_augment_magnitude)``, Cubuk et al. 2020), 'trivialaugment'
            (``v2.TrivialAugmentWide()``, Mueller & Hutter 2021) or 'none'. Their geometric ops
            (rotate, shear, translate) interpolate bilinearly (v2 on tensors has no bicubic) and fill with 0.

    Returns:
        training with ``augment='standard'``: a :class:`RandomResizedCropFlip` (callable on a decoded
        tensor, plus ``from_bytes`` for fused decoding); otherwise a ``torchvision.transforms.v2.Compose``.
        Random ops draw from torch's global RNG (the loaders in :mod:`trainer.data` seed and scope it
        per worker).

    Raises:
        ValueError: a bad ``input_size``, ``crop_pct``, ``interpolation``, ``augment`` or ``auto_augment`` (named).
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
    if auto_augment not in AUTO_AUGMENTS:
        raise ValueError(f"build_transforms: auto_augment must be one of {list(AUTO_AUGMENTS)}, got {auto_augment!r}")
    mode = _INTERPOLATIONS[interpolation]
    if train and augment == "standard":
        policy, bilinear = None, v2.InterpolationMode.BILINEAR  # v2's tensor affine: nearest/bilinear only
        if auto_augment == "randaugment":
            policy = v2.RandAugment(num_ops=auto_augment_ops, magnitude=auto_augment_magnitude, interpolation=bilinear)
        elif auto_augment == "trivialaugment":
            policy = v2.TrivialAugmentWide(interpolation=bilinear)
        return RandomResizedCropFlip(input_size, scale=scale, ratio=(3 / 4, 4 / 3), interpolation=mode,
                                     fast_dct=True, policy=policy)
    return v2.Compose([
        v2.Resize(int(input_size / crop_pct), interpolation=mode, antialias=True),
        v2.CenterCrop(input_size),
    ])
