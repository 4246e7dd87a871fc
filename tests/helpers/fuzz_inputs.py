"""Hostile image bytes for fuzzing the decoders: small real JPEG/PNG/GIF/WebP files (from ants/bees photos)
and mutations of them (byte flips, truncations, splices, huge dimensions in the header, a decompression
bomb). Used by tests/test_fuzz.py (hypothesis, small count) and bench/fuzz.py (seeded, >= 10,000 inputs).
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

from helpers.realdata import HYMENOPTERA

FORMATS = ("jpeg", "png", "gif", "webp")
MUTATIONS = ("flip", "truncate", "splice", "huge_header", "magic_noise", "bomb", "none")


@lru_cache(maxsize=None)
def _photo() -> Image.Image:
    """A 48 x 36 crop of the first ants/bees training photo (a synthetic gradient without the data set)."""
    files = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg")) if HYMENOPTERA.is_dir() else []
    if files:
        with Image.open(files[0]) as im:
            return im.convert("RGB").resize((48, 36))
    y, x = np.mgrid[0:36, 0:48]
    return Image.fromarray(np.stack([x * 5, y * 7, (x + y) * 3], axis=2).astype(np.uint8))


@lru_cache(maxsize=None)
def base_files() -> dict[str, bytes]:
    """``{name: bytes}`` of valid small images: JPEG (baseline, progressive, gray), PNG (RGB, RGBA,
    palette), GIF, WebP (lossy, lossless)."""
    im = _photo()
    out = {}

    def save(name, image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        out[name] = buf.getvalue()

    save("jpeg", im, "JPEG", quality=85)
    save("jpeg_progressive", im, "JPEG", quality=85, progressive=True)
    save("jpeg_gray", im.convert("L"), "JPEG")
    save("png", im, "PNG")
    rgba = im.convert("RGBA")
    rgba.putalpha(128)
    save("png_rgba", rgba, "PNG")
    save("png_palette", im.convert("P"), "PNG")
    save("gif", im.convert("P"), "GIF")
    save("webp", im, "WEBP", quality=80)
    save("webp_lossless", im, "WEBP", lossless=True)
    return out


def set_header_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` with the image size in its header replaced (PNG CRC recomputed); unknown layouts unchanged."""
    b = bytearray(data)
    if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
        b[16:24] = struct.pack(">II", width, height)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    elif b[:6] in (b"GIF87a", b"GIF89a"):
        b[6:10] = struct.pack("<HH", min(width, 65535), min(height, 65535))
        pos = b.find(b"\x2c", 13)  # first image descriptor
        if pos > 0 and pos + 9 <= len(b):
            b[pos + 5:pos + 9] = struct.pack("<HH", min(width, 65535), min(height, 65535))
    elif b[:3] == b"\xff\xd8\xff":
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            pos = b.find(marker)
            if pos > 0:
                b[pos + 5:pos + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
                break
    elif b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        w, h = min(width, 16383), min(height, 16383)  # 14-bit fields
        if b[12:16] == b"VP8 ":
            b[26:30] = struct.pack("<HH", w, h)
        elif b[12:16] == b"VP8L":
            w, h = w - 1, h - 1
            bits = w | (h << 14) | (int.from_bytes(b[21:25], "little") & ~((1 << 28) - 1))
            b[21:25] = bits.to_bytes(4, "little")
    return bytes(b)


@lru_cache(maxsize=None)
def png_bomb(side: int = 10_000) -> bytes:
    """A valid grayscale PNG of ``side x side`` zero pixels (100 M pixels by default) in about 100 kB."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    comp = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 + pixels
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    """One hostile variant of ``data`` (see :data:`MUTATIONS`), deterministic for a seeded ``rng``."""
    n = len(data)
    if kind == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(n)] = rng.randrange(256)
        return bytes(b)
    if kind == "truncate":
        return data[:rng.randrange(n)]
    if kind == "splice":
        i, j = sorted(rng.randrange(n) for _ in range(2))
        if rng.random() < 0.5:
            return data[:i] + data[j:]  # delete a chunk
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[i:]
    if kind == "huge_header":
        side = rng.choice([50_000, 65_535, 16_384, 10_000, rng.randint(1, 70_000)])
        return set_header_size(data, side, rng.choice([side, rng.randint(1, 70_000)]))
    if kind == "magic_noise":
        return data[:rng.randint(2, 16)] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))
    if kind == "bomb":
        return png_bomb()
    return data


def hostile_input(seed: int) -> tuple[str, str, bytes]:
    """``(base name, mutation, bytes)`` number ``seed`` of the seeded stream bench/fuzz.py runs."""
    rng = random.Random(seed)
    files = base_files()
    name = rng.choice(sorted(files))
    kind = rng.choices(MUTATIONS, weights=(30, 20, 20, 15, 10, 1, 4))[0]
    return name, kind, mutate(files[name], kind, rng)
