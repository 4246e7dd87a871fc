"""trainer/data/ and trainer/data/transforms.py: shard resolution, rank/worker splitting, lockstep,
bad samples, colour modes (failure cases 1-5). Ranks are simulated in one process (rank=0/1); the
real 2-process run is in test_data_ddp.py."""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.decode import (
    TRANSPARENCY_BACKGROUND,
    ImageDecodeError,
    decode_image_bytes,
)
from trainer.data.loader import EvalLoader, TrainLoader
from trainer.data.meta import read_meta
from trainer.data.sources import resolve_shards, steps_per_epoch
from trainer.data.stream import BadSampleError
from trainer.data.transforms import build_transforms

from tests.helpers.data_synth import jpeg_bytes, write_samples, write_tar_shards

S = 8  # output side of the test transforms
TRAIN_TF = build_transforms(S, train=True)
EVAL_TF = build_transforms(S, train=False)


def train_loader(shards, rank, world_size=2, **kw):
    args = dict(rank=rank, world_size=world_size, micro_batch_size=16, num_workers=0, transform=TRAIN_TF,
                seed=0, shuffle_buffer=10)
    args.update(kw)
    return TrainLoader(shards, **args)


def eval_keys(shards, world_size, num_workers, micro_batch_size=16):
    per_rank = []
    for rank in range(world_size):
        loader = EvalLoader(shards, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                            num_workers=num_workers, transform=EVAL_TF)
        per_rank.append([k for b in loader for k in b["key"]])
    return per_rank


# ---------------------------------------------------------------- case 1: fewer shards than readers

@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_shards", [1, 3])
def test_fewer_shards_than_readers_is_a_clear_error(tmp_path, num_shards):
    shards, _ = write_tar_shards(tmp_path, [6] * num_shards)
    with pytest.raises(ValueError, match=rf"{num_shards} shard\(s\) for 2 rank\(s\) x 2 worker\(s\) = 4 readers"):
        train_loader(shards, rank=0, num_workers=2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_shards", [1, 3])
def test_fewer_shards_resampled_keeps_every_rank_stepping(tmp_path, num_shards):
    shards, keys = write_tar_shards(tmp_path, [6] * num_shards)
    counts = []
    for rank in range(2):
        loader = train_loader(shards, rank=rank, num_workers=2, resampled=True, micro_batch_size=4)
        batches = list(loader.epoch(0, 5))
        loader.close()
        counts.append(len(batches))
        assert all(b["image"].shape == (4, 3, S, S) and b["image"].dtype == torch.uint8 for b in batches)
        assert {k for b in batches for k in b["key"]} <= set(keys)
    assert counts == [5, 5]


# ---------------------------------------------------------------- case 2: uneven shards

def test_uneven_shards_same_steps_on_every_rank(tmp_path):
    shards, keys = write_tar_shards(tmp_path, [100, 100, 40])
    num_batches = steps_per_epoch(240, global_batch_size=16 * 2)
    assert num_batches == 8
    for epoch in range(3):  # the rank holding 100+40 and the rank holding 100 alternate with the order
        per_rank = []
        for rank in range(2):
            batches = list(train_loader(shards, rank=rank).epoch(epoch, num_batches))
            assert all(b["image"].shape == (16, 3, S, S) for b in batches)
            per_rank.append(len(batches))
        assert per_rank == [8, 8]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uneven_shards_eval_sees_each_sample_once(tmp_path, num_workers):
    shards, keys = write_tar_shards(tmp_path, [100, 100, 40])
    per_rank = eval_keys(shards, world_size=2, num_workers=num_workers)
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == sorted(keys)  # no duplicate, nothing missing (3 shards < 4 readers with 2 workers)


@pytest.mark.parametrize("num_shards,world_size,num_workers", [(1, 2, 0), (1, 3, 2), (2, 2, 2), (5, 2, 0)])
def test_eval_exactly_once_any_shard_count(tmp_path, num_shards, world_size, num_workers):
    shards, keys = write_tar_shards(tmp_path, [7] * num_shards)
    seen = [k for r in eval_keys(shards, world_size, num_workers, micro_batch_size=3) for k in r]
    assert sorted(seen) == sorted(keys)


def test_steps_per_epoch():
    assert steps_per_epoch(240, 32) == 8
    assert steps_per_epoch(241, 32) == 8
    assert steps_per_epoch(245, 64) == 4
    assert steps_per_epoch(3, 64) == 1
    with pytest.raises(ValueError, match="global_batch_size"):
        steps_per_epoch(10, 0)


# ---------------------------------------------------------------- case 3: node splitting

@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_disjoint_and_cover_epoch(tmp_path, num_workers):
    shards, keys = write_tar_shards(tmp_path, [10, 10, 10, 10])
    num_batches = steps_per_epoch(40, global_batch_size=5 * 2)
    train = []
    for rank in range(2):
        loader = train_loader(shards, rank=rank, micro_batch_size=5, num_workers=num_workers)
        train.append([k for b in loader.epoch(0, num_batches) for k in b["key"]])
        loader.close()
    assert len(train[0]) == len(train[1]) == 20
    assert not set(train[0]) & set(train[1])
    assert sorted(train[0] + train[1]) == sorted(keys)
    ev = eval_keys(shards, world_size=2, num_workers=num_workers)
    assert not set(ev[0]) & set(ev[1]) and sorted(ev[0] + ev[1]) == sorted(keys)


def test_train_epochs_reproducible_and_reshuffled(tmp_path):
    shards, _ = write_tar_shards(tmp_path, [10, 10, 10, 10])

    def run(epoch):
        batches = list(train_loader(shards, rank=0, micro_batch_size=5).epoch(epoch, 4))
        return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches])

    rng_before = torch.get_rng_state()
    k0, x0 = run(0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's global RNG is untouched
    k0b, x0b = run(0)
    k1, _ = run(1)
    assert k0 == k0b and torch.equal(x0, x0b)
    assert k0 != k1


# ---------------------------------------------------------------- case 4: corrupt samples

def corrupt_shard(tmp_path) -> tuple[str, list[str]]:
    good = jpeg_bytes(1, size=(40, 30))
    samples = [{"__key__": f"good{j}", "jpg": jpeg_bytes(j), "cls": b"1"} for j in range(7)]
    samples.insert(2, {"__key__": "halfcut", "jpg": good[: len(good) // 2], "cls": b"0"})
    samples.insert(5, {"__key__": "randombytes", "jpg": np.random.default_rng(0).bytes(300), "cls": b"0"})
    samples.insert(8, {"__key__": "nolabel", "jpg": jpeg_bytes(99)})
    assert len(samples) == 10
    return write_samples(tmp_path / "bad-000000.tar", samples), [f"good{j}" for j in range(7)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_samples_skipped_and_reported_ranks_in_lockstep(tmp_path, num_workers):
    bad, good_keys = corrupt_shard(tmp_path)
    ok, _ = write_tar_shards(tmp_path, [10], prefix="ok")
    shards = [bad] + ok
    per_rank = []
    for rank in range(2):
        loader = train_loader(shards, rank=rank, micro_batch_size=4, num_workers=num_workers, shuffle_buffer=0)
        batches = list(loader.epoch(0, 6))
        loader.close()
        per_rank.append(batches)
    assert [len(b) for b in per_rank] == [6, 6]
    bad_rank = [b for b in per_rank if any(k.startswith("good") for x in b for k in x["key"])][0]
    skipped = [s for b in bad_rank for s in b["skipped"]]
    # a rank that cycles over its shard several times reports each bad sample once per pass
    assert {s.split(": ")[0] for s in skipped} == {f"{bad}:halfcut", f"{bad}:randombytes", f"{bad}:nolabel"}
    assert any("no 'cls' label" in s for s in skipped)
    assert {k for b in bad_rank for k in b["key"]} == set(good_keys)

    ev = EvalLoader([bad], rank=0, world_size=1, micro_batch_size=4, num_workers=num_workers, transform=EVAL_TF)
    batches = list(ev)
    assert sorted(k for b in batches for k in b["key"]) == sorted(good_keys)
    assert sorted(s.split(": ")[0] for b in batches for s in b["skipped"]) == sorted(
        f"{bad}:{k}" for k in ("halfcut", "randombytes", "nolabel"))
    assert len(ev.last_skipped) == 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_samples_strict_raises_with_location(tmp_path, num_workers):
    bad, _ = corrupt_shard(tmp_path)
    loader = TrainLoader([bad], rank=0, world_size=1, micro_batch_size=2, num_workers=num_workers,
                         transform=TRAIN_TF, shuffle_buffer=0, bad_samples="strict")
    with pytest.raises(BadSampleError, match=rf"{bad}:halfcut: "):
        list(loader.epoch(0, 5))
    ev = EvalLoader([bad], rank=0, world_size=1, micro_batch_size=2, num_workers=0, transform=EVAL_TF,
                    bad_samples="strict")
    with pytest.raises(BadSampleError, match=rf"{bad}:halfcut: "):
        list(ev)


@pytest.mark.timeout(60)
def test_all_bad_shards_raise_instead_of_spinning(tmp_path):
    junk = write_samples(tmp_path / "junk-000000.tar",
                         [{"__key__": f"k{j}", "jpg": b"not an image", "cls": b"0"} for j in range(5)])
    loader = TrainLoader([junk], rank=0, world_size=1, micro_batch_size=2, num_workers=0, transform=TRAIN_TF,
                         shuffle_buffer=3)
    with pytest.raises(RuntimeError, match="no decodable sample"):
        list(loader.epoch(0, 3))
    missing_ok = write_tar_shards(tmp_path, [4], prefix="fine")[0]
    truncated = tmp_path / "trunc-000000.tar"
    truncated.write_bytes(Path(missing_ok[0]).read_bytes()[:700])
    loader = TrainLoader([str(truncated)], rank=0, world_size=1, micro_batch_size=2, num_workers=0,
                         transform=TRAIN_TF, shuffle_buffer=0)
    with pytest.raises(RuntimeError, match="no sample could be read|no decodable sample"):
        list(loader.epoch(0, 3))


def test_label_outside_num_classes_is_bad(tmp_path):
    shard = write_samples(tmp_path / "x-000000.tar", [{"__key__": "a", "jpg": jpeg_bytes(0), "cls": b"7"},
                                                      {"__key__": "b", "jpg": jpeg_bytes(1), "cls": b"1"}])
    ev = EvalLoader([shard], rank=0, world_size=1, micro_batch_size=4, num_workers=0, transform=EVAL_TF,
                    num_classes=3)
    batches = list(ev)
    assert [k for b in batches for k in b["key"]] == ["b"]
    assert batches[0]["label"].tolist() == [1] and "label 7 outside [0, 3)" in batches[0]["skipped"][0]


# ---------------------------------------------------------------- case 5: colour modes

def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def colour_mode_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    alpha = np.full((16, 20), 255, np.uint8)
    alpha[:8] = 0  # top half transparent
    pal_idx = np.zeros((16, 20), np.uint8)
    pal_idx[8:] = 1
    pal = Image.fromarray(pal_idx, "P")
    pal.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    gray16 = Image.fromarray(np.arange(16 * 20, dtype=np.uint16).reshape(16, 20) * 200)
    return {
        "cmyk.jpg": _enc(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
        "gray.jpg": _enc(Image.fromarray(rgb).convert("L"), "JPEG"),
        "rgba.png": _enc(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"),
        "palette_trns.png": _enc(pal, "PNG", transparency=0),
        "gray16.png": _enc(gray16, "PNG"),
        "palette_trns.gif": _enc(pal, "GIF", transparency=0),
        "rgb.bmp": _enc(Image.fromarray(rgb), "BMP"),
    }


@pytest.mark.parametrize("name", list(colour_mode_files()))
def test_colour_modes_become_rgb(name):
    data = colour_mode_files()[name]
    img = decode_image_bytes(data)
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 20)
    white = torch.tensor(TRANSPARENCY_BACKGROUND, dtype=torch.uint8).view(3, 1)
    if name in ("rgba.png", "palette_trns.png", "palette_trns.gif"):
        assert torch.equal(img[:, :8].reshape(3, -1), white.expand(3, 8 * 20))  # transparent -> white
    if name.startswith("palette"):
        assert img[:, 12, 5].tolist() == [200, 0, 0]
    if name == "gray16.png":  # 16-bit scaled to 8 bits, not clipped at 255
        ref = (np.arange(16 * 20).reshape(16, 20) * 200) >> 8
        assert np.abs(img[0].numpy().astype(int) - ref).max() <= 1 and torch.equal(img[0], img[2])
    if name == "cmyk.jpg":  # close to the RGB original (JPEG loss + CMYK round trip)
        rgb = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
        assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - rgb).mean() < 40


def test_colour_modes_through_a_shard(tmp_path):
    files = colour_mode_files()
    samples = [{"__key__": name.replace(".", "_"), name.rsplit(".", 1)[1]: data, "cls": b"0"}
               for name, data in files.items()]
    shard = write_samples(tmp_path / "colour-000000.tar", samples)
    batches = list(EvalLoader([shard], rank=0, world_size=1, micro_batch_size=32, num_workers=0,
                              transform=EVAL_TF))
    assert len(batches) == 1 and batches[0]["image"].shape == (len(files), 3, S, S)
    assert batches[0]["skipped"] == []
    assert batches[0]["image"].is_contiguous(memory_format=torch.channels_last)  # what the model takes


def test_decode_errors():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image_bytes(b"")
    good = jpeg_bytes(0, size=(64, 48))
    with pytest.raises(ImageDecodeError, match="truncated|incomplete"):
        decode_image_bytes(good[: len(good) // 2])
    with pytest.raises(ImageDecodeError):
        decode_image_bytes(b"\x00" * 100)


# ---------------------------------------------------------------- transforms

def test_build_transforms_shapes_and_determinism():
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    for train in (True, False):
        out = build_transforms(32, train=train)(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    ev = build_transforms(32, train=False, crop_pct=0.875)
    assert torch.equal(ev(img), ev(img))
    assert torch.equal(build_transforms(32, train=True, augment="none")(img), ev(img))
    assert build_transforms(224, train=False).transforms[0].size == [256]
    with pytest.raises(ValueError, match="augment"):
        build_transforms(32, train=True, augment="heavy")
    with pytest.raises(ValueError, match="interpolation"):
        build_transforms(32, train=True, interpolation="lanczos")


# ---------------------------------------------------------------- shard specs

def test_resolve_shards_specs(tmp_path):
    shards, _ = write_tar_shards(tmp_path, [2, 2, 2])
    brace = str(tmp_path / "train-{000000..000002}.tar")
    assert resolve_shards(brace) == shards
    assert resolve_shards(str(tmp_path / "train-*.tar")) == shards
    assert resolve_shards(str(tmp_path)) == shards
    assert resolve_shards(shards[:2]) == shards[:2]
    assert resolve_shards("http://host/x-{0..1}.tar") == ["http://host/x-0.tar", "http://host/x-1.tar"]
    assert resolve_shards("pipe:cat a.tar") == ["pipe:cat a.tar"]
    with pytest.raises(FileNotFoundError, match="train-{000000..000005}"):
        resolve_shards(str(tmp_path / "train-{000000..000005}.tar"))
    with pytest.raises(FileNotFoundError, match="nothing-"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))


def test_pipe_shards(tmp_path):
    shards, keys = write_tar_shards(tmp_path, [5, 5])
    spec = "pipe:cat " + str(tmp_path / "train-{000000..000001}.tar")
    urls = resolve_shards(spec)
    assert urls == [f"pipe:cat {s}" for s in shards]
    seen = [k for b in EvalLoader(urls, rank=0, world_size=1, micro_batch_size=4, num_workers=0,
                                  transform=EVAL_TF) for k in b["key"]]
    assert sorted(seen) == sorted(keys)


@pytest.mark.timeout(120)
def test_http_shards(tmp_path):
    shards, keys = write_tar_shards(tmp_path, [6, 6, 6])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))

    class Quiet(handler.func):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = resolve_shards(base + "/train-{000000..000002}.tar")
        seen = [k for b in EvalLoader(urls, rank=0, world_size=1, micro_batch_size=4, num_workers=0,
                                      transform=EVAL_TF) for k in b["key"]]
        assert sorted(seen) == sorted(keys)
        loader = TrainLoader(urls, rank=0, world_size=1, micro_batch_size=6, num_workers=2, transform=TRAIN_TF,
                             shuffle_buffer=4)
        assert sum(len(b["key"]) for b in loader.epoch(0, 3)) == 18
        loader.close()
        missing = EvalLoader([base + "/missing-000000.tar"], rank=0, world_size=1, micro_batch_size=4,
                             num_workers=0, transform=EVAL_TF)
        assert list(missing) == [] and "missing-000000.tar:<shard>" in missing.last_skipped[0]
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- metadata

def test_read_meta_errors_name_file_and_key(tmp_path):
    good = {"format_version": 1, "classes": ["a", "b"],
            "splits": {"train": {"num_samples": 3, "num_shards": 1, "class_counts": [1, 2],
                                 "shards": ["train-000000.tar"]}}}
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps(good))
    meta = read_meta(tmp_path)
    assert meta.classes == ["a", "b"] and meta.num_classes == 2 and meta.splits["train"].num_samples == 3
    assert meta.shard_urls("train") == [str(tmp_path / "train-000000.tar")]
    with pytest.raises(KeyError, match="no split 'val'"):
        meta.shard_urls("val")
    bad = json.loads(json.dumps(good))
    del bad["splits"]["train"]["num_samples"]
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"dataset.json: missing key 'splits.train.num_samples'"):
        read_meta(p)
    bad = json.loads(json.dumps(good))
    bad["splits"]["train"]["class_counts"] = [1, 1]
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="splits.train.class_counts"):
        read_meta(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_meta(p)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_meta(tmp_path / "nope.json")


# ---------------------------------------------------------------- worker threads and priority

class _WorkerProbe:
    """Eval transform that writes its process's niceness increase and torch thread count into the image."""

    def __init__(self, parent_nice: int):
        self.parent_nice = parent_nice

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import os
        return torch.tensor([os.nice(0) - self.parent_nice, torch.get_num_threads(), 0],
                            dtype=torch.uint8).view(3, 1, 1).expand(3, S, S).clone()


@pytest.mark.timeout(120)
def test_loader_workers_run_one_torch_thread_at_lower_priority(tmp_path):
    """Each DataLoader worker runs torch with one thread at WORKER_NICE above the training process (so
    it never pre-empts the training process's OpenMP threads); the training process is untouched."""
    import os

    from trainer.data import loader as loader_mod

    shards, _ = write_tar_shards(tmp_path, [4, 4])
    before = (os.nice(0), torch.get_num_threads())
    probe = _WorkerProbe(os.nice(0))
    batches = list(EvalLoader(shards, rank=0, world_size=1, micro_batch_size=2, num_workers=2, transform=probe))
    want_nice = min(19, before[0] + loader_mod.WORKER_NICE) - before[0]
    assert loader_mod.WORKER_NICE > 0 and len(batches) == 4
    for b in batches:
        assert b["image"][:, 0, 0, 0].tolist() == [want_nice] * 2  # niceness added in the worker
        assert b["image"][:, 1, 0, 0].tolist() == [loader_mod.WORKER_TORCH_THREADS] * 2
    assert (os.nice(0), torch.get_num_threads()) == before


def test_one_list_of_image_extensions():
    """Issue 24: every list of image suffixes is trainer.data.extensions' (predict and the shard reader had
    their own, which disagreed on .ppm/.pgm). An AST scan: no other literal holds three image extensions."""
    import ast

    from trainer.data.extensions import IMAGE_EXTENSIONS, IMAGE_FIELDS

    repo = Path(__file__).resolve().parents[1]
    known = {e.lstrip(".") for e in IMAGE_EXTENSIONS}
    own = []
    for folder in ("trainer", "launch", "bench"):
        for path in sorted((repo / folder).rglob("*.py")):
            if path == repo / "trainer" / "data" / "extensions.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                    words = {e.value.lower().lstrip(".") for e in node.elts
                             if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                    if len(words & known) >= 3:
                        own.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert own == [], f"image extension lists outside trainer/data/extensions.py: {own}"
    assert set(IMAGE_FIELDS) >= known and all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)
