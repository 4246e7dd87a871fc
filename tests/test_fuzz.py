"""Hostile image bytes: the shard writer's check and the training/eval decoders never crash, never hang,
and refuse an image larger than PIL.Image.MAX_IMAGE_PIXELS from its header, before decoding.

A seeded hypothesis run over tests/helpers/fuzz_inputs.py here (small count); the full count
(>= 10,000 inputs) is ``python bench/fuzz.py --inputs 10000``.
"""

from __future__ import annotations

import resource
import time

import pytest
import torch
from helpers.fuzz_inputs import base_files, hostile_input, png_bomb, set_header_size
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.decode import ImageDecodeError, decode_image_bytes
from trainer.data.shard_writer import check_image
from trainer.data.transforms import build_transforms

TRAIN_TF = build_transforms(64, train=True)


def _outcome(fn, data, errors):
    """'ok' for a (3, H, W) uint8 result, 'rejected' for one of ``errors``; anything else fails the test."""
    try:
        out = fn(data)
    except errors:
        return "rejected"
    if isinstance(out, tuple):  # check_image: (bytes, ext)
        assert isinstance(out[0], bytes) and out[1] in ("jpg", "png", "gif", "webp")
    else:
        assert out.dtype == torch.uint8 and out.ndim == 3 and out.shape[0] == 3
    return "ok"


def _all_targets(data):
    return (_outcome(check_image, data, ValueError), _outcome(decode_image_bytes, data, ImageDecodeError),
            _outcome(TRAIN_TF.from_bytes, data, ImageDecodeError))


def test_every_base_file_decodes():
    for name, data in base_files().items():
        assert _all_targets(data) == ("ok", "ok", "ok"), name


@pytest.mark.parametrize("name", sorted(base_files()))
def test_a_50000_x_50000_header_is_refused_before_decoding(name):
    data = set_header_size(base_files()[name], 50_000, 50_000)
    if data == base_files()[name]:
        pytest.skip("no size field found")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for fn in (decode_image_bytes, TRAIN_TF.from_bytes):
        with pytest.raises(ImageDecodeError, match=r"pixels|DecompressionBomb|decode"):
            fn(data)
    with pytest.raises(ValueError):
        check_image(data)
    assert time.perf_counter() - t < 10
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"{grown_mb:.0f} MB"  # a decode of 2.5 G pixels would need 7.5 GB


def test_header_size_is_checked_against_the_limit_before_decoding():
    data = set_header_size(base_files()["png"], 20_000, 20_000)  # 400 M pixels, PNG CRC fixed
    with pytest.raises(ImageDecodeError, match=r"20000 x 20000 = 400,000,000 pixels, more than the limit"):
        decode_image_bytes(data)
    jpeg = set_header_size(base_files()["jpeg"], 10_000, 9_000)  # 90 M pixels: just above PIL's 89,478,485
    for fn in (decode_image_bytes, TRAIN_TF.from_bytes):
        with pytest.raises(ImageDecodeError, match=r"10000 x 9000 = 90,000,000 pixels"):
            fn(jpeg)


def test_a_decompression_bomb_is_refused_quickly():
    bomb = png_bomb()  # valid PNG, 10,000 x 10,000 zero pixels in ~100 kB
    t = time.perf_counter()
    assert _all_targets(bomb) == ("rejected",) * 3
    assert time.perf_counter() - t < 5


@settings(max_examples=300, deadline=None, derandomize=True)
@given(seed=st.integers(min_value=0, max_value=2**31))
def test_hostile_inputs_never_crash(seed):
    _, _, data = hostile_input(seed)
    t = time.perf_counter()
    _all_targets(data)
    assert time.perf_counter() - t < 10  # no hang
