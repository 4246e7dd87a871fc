"""Fuzz the image checks and decoders with hostile bytes; print counts (inputs, crashes, rejections by kind).

    python bench/fuzz.py --inputs 10000 --seed 0

Each input is a small real JPEG/PNG/GIF/WebP (made from an ants/bees photo) mutated by byte flips,
truncation, splicing, huge dimensions written into the header, noise after a valid magic number, or a
100-megapixel PNG decompression bomb (``tests/helpers/fuzz_inputs.py``). Every input goes through

* ``trainer.data.shard_writer.check_image`` (the shard writer's check): must return or raise ValueError;
* ``trainer.data.decode.decode_image_bytes`` (evaluation / plain path): must return a ``(3, H, W)`` uint8
  tensor or raise ``ImageDecodeError``;
* ``RandomResizedCropFlip.from_bytes`` (training's fused path): the same.

Any other exception is a crash. An image larger than ``PIL.Image.MAX_IMAGE_PIXELS`` must be refused from
its header, before decoding; peak memory (``ru_maxrss``) and the slowest input are printed (an image just
under the limit, e.g. a 7410 x 10059 progressive JPEG header, is decoded in full: seconds on a busy CPU).
Exit status 1 if anything crashed or an input took longer than ``--max_seconds`` (a hang).
"""

from __future__ import annotations

import collections
import resource
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import fire  # noqa: E402
import torch  # noqa: E402

from helpers.fuzz_inputs import hostile_input  # noqa: E402
from trainer.data.decode import ImageDecodeError, decode_image_bytes  # noqa: E402
from trainer.data.shard_writer import check_image  # noqa: E402
from trainer.data.transforms import build_transforms  # noqa: E402


def _kind(message: str) -> str:
    """A short class of a rejection message (for the counts)."""
    m = message.lower()
    for key, label in (("pixels, more than", "too many pixels (header)"), ("empty", "empty"),
                       ("truncated", "truncated"), ("cannot identify", "unidentified format"),
                       ("crc", "checksum"), ("broken", "broken structure")):
        if key in m:
            return label
    return "other decode error"


def check_one(data: bytes, train_tf) -> dict[str, str]:
    """Outcome per target: ``ok``, ``rejected: <kind>`` or ``CRASH <type>: <message>``."""
    out = {}
    try:
        stored, _ = check_image(data)
        out["check_image"] = "ok"
    except ValueError as e:
        out["check_image"] = f"rejected: {_kind(str(e))}"
    except Exception as e:  # noqa: BLE001 - the point of fuzzing
        out["check_image"] = f"CRASH {type(e).__name__}: {e}"
    for name, fn in (("decode_image_bytes", decode_image_bytes), ("from_bytes", train_tf.from_bytes)):
        try:
            img = fn(data)
            ok = img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3
            out[name] = "ok" if ok else f"CRASH bad output {tuple(img.shape)} {img.dtype}"
        except ImageDecodeError as e:
            out[name] = f"rejected: {_kind(str(e))}"
        except Exception as e:  # noqa: BLE001
            out[name] = f"CRASH {type(e).__name__}: {e}"
    return out


def main(inputs: int = 10_000, seed: int = 0, max_seconds: float = 30.0) -> int:
    """Run ``inputs`` seeded hostile inputs through the three targets; print the counts."""
    warnings.simplefilter("ignore")
    torch.manual_seed(seed)
    train_tf = build_transforms(64, train=True)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    mutations: collections.Counter = collections.Counter()
    crashes, slowest = [], (0.0, None)
    t0 = time.perf_counter()
    for i in range(seed * 10**7, seed * 10**7 + inputs):
        base, kind, data = hostile_input(i)
        mutations[kind] += 1
        t = time.perf_counter()
        result = check_one(data, train_tf)
        dt = time.perf_counter() - t
        if dt > slowest[0]:
            slowest = (dt, (i, base, kind))
        for target, outcome in result.items():
            counts[target][outcome] += 1
            if outcome.startswith("CRASH"):
                crashes.append((i, base, kind, target, outcome))
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"inputs={inputs} seed={seed} seconds={seconds:.1f} crashes={len(crashes)} "
          f"slowest_input_s={slowest[0]:.3f} {slowest[1]} peak_rss_mb={peak_mb:.0f}")
    print("mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(mutations.items())))
    for target, c in counts.items():
        print(f"{target}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])))
    for crash in crashes[:20]:
        print("CRASH", crash)
    return 1 if crashes or slowest[0] > max_seconds else 0


if __name__ == "__main__":
    sys.exit(fire.Fire(main, serialize=lambda _: None))
