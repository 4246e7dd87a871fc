"""launch/predict.py inputs and output (issue 14 item 6, issue 15 item 2): folder / CSV list / shards, loader
workers with rows in input order, unreadable images listed with their error, file names as bytes."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.data_synth import jpeg_bytes, write_class_tree
from tests.helpers.inprocess import make_checkpoint
from trainer.data.listing import escape_name, unescape_name

REPO = Path(__file__).resolve().parents[1]

ODD = b"caf\xe9 \\x41\n,\"x\".jpg"  # not UTF-8, a backslash sequence, a newline, a comma and quotes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best")


def reference(ckpt, files: list[Path | bytes]) -> torch.Tensor:
    """(N, C) probabilities image by image with the checkpoint's eval preprocessing (what evaluation uses)."""
    from trainer.data.decode import decode_image_bytes
    from trainer.data.transforms import build_transforms
    from trainer.checkpoint.inference import load_for_inference

    model, pre, _ = load_for_inference(ckpt)
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    with torch.inference_mode():
        return torch.cat([model(tf(decode_image_bytes(open(f, "rb").read()))[None]).softmax(1) for f in files])


def read(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def probs(rows, classes=("ants", "bees")) -> torch.Tensor:
    return torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r in rows])


def test_escape_name_round_trips_any_bytes():
    for raw in (ODD, b"plain.jpg", b"a\\\\b", b"\xff\xfe\x00\x7f", "naïve\u2028ü".encode(), bytes(range(1, 256))):
        text = escape_name(os.fsdecode(raw))
        assert unescape_name(text) == raw and text.isprintable()
    assert escape_name("ants/img 1.jpg") == "ants/img 1.jpg"


def test_folder_with_odd_name_and_broken_file(ckpt, tmp_path):
    from launch.predict import main

    root = tmp_path / "imgs"
    paths = write_class_tree(root, {"ants": 2, "bees": 2}, seed=3)
    odd = os.fsencode(root / "bees") + b"/" + ODD
    fd = os.open(odd, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, jpeg_bytes(77))
    os.close(fd)
    (root / "ants" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "bees" / "notes.txt").write_text("not an image suffix: not listed")
    acc = main(str(ckpt), str(root), out=str(tmp_path / "p.csv"), precision="fp32", num_workers=0, batch_size=2)
    rows = read(tmp_path / "p.csv")
    names = [unescape_name(r["path"]) for r in rows]
    assert sorted(names) == sorted([os.fsencode(p) for p in paths] + [odd, os.fsencode(root / "ants/broken.jpg")])
    assert all("\n" not in r["path"] for r in rows)
    broken = next(r for r in rows if r["path"].endswith("broken.jpg"))
    assert broken["pred"] == "" and broken["true"] == "ants" and "ImageDecodeError" in broken["error"]
    good = [r for r in rows if r["pred"]]
    files = [os.fsdecode(unescape_name(r["path"])) for r in good]
    torch.testing.assert_close(probs(good), reference(ckpt, files), atol=1e-5, rtol=0)
    assert [r["true"] for r in good] == [Path(f).parent.name for f in files]
    assert acc == pytest.approx(sum(r["true"] == r["pred"] for r in good) / 5)
    assert all(r["error"] == "" for r in good) and all(r["top1"] == r["pred"] for r in good)


def test_csv_list_relative_paths_in_csv_order(ckpt, tmp_path):
    from launch.predict import main

    root = tmp_path / "d"
    paths = write_class_tree(root / "img", {"ants": 2, "bees": 3}, seed=11)
    order = [paths[i] for i in (4, 0, 2, 1, 3)]
    lines = ["id,image,class"] + [f"{i},{p.relative_to(root).as_posix()},{p.parent.name}" for i, p in enumerate(order)]
    lines.insert(3, "9,img/missing.jpg,ants")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    main(str(ckpt), str(root / "list.csv"), out=str(tmp_path / "p.csv"), precision="fp32", num_workers=0, batch_size=4)
    rows = read(tmp_path / "p.csv")
    assert [Path(r["path"]).name for r in rows] == [p.name for p in order[:2]] + ["missing.jpg"] + \
        [p.name for p in order[2:]]
    missing = rows[2]
    assert missing["pred"] == "" and "FileNotFoundError" in missing["error"] and missing["true"] == "ants"
    good = [r for r in rows if r["pred"]]
    assert [r["true"] for r in good] == [p.parent.name for p in order]
    torch.testing.assert_close(probs(good), reference(ckpt, order), atol=1e-5, rtol=0)


def test_shards_names_and_labels_from_the_samples(ckpt, tmp_path):
    from launch.predict import main

    from trainer.data.listing import list_split_folders
    from trainer.data.shard_writer import write_listing

    root = tmp_path / "ds"
    write_class_tree(root / "train", {"ants": 2, "bees": 2})
    val = write_class_tree(root / "val", {"ants": 2, "bees": 1}, seed=8)
    write_listing(list_split_folders(root), tmp_path / "shards", max_samples_per_shard=2)
    main(str(ckpt), str(tmp_path / "shards" / "val-*.tar"), out=str(tmp_path / "p.csv"), precision="fp32", num_workers=0)
    rows = read(tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [p.relative_to(root).as_posix() for p in val]
    assert [r["true"] for r in rows] == [p.parent.name for p in val]
    torch.testing.assert_close(probs(rows), reference(ckpt, val), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_loader_workers_keep_input_order_and_values(ckpt, tmp_path):
    from launch.predict import main

    root = tmp_path / "imgs"
    write_class_tree(root, {"ants": 5, "bees": 6}, seed=21)
    (root / "bees" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    main(str(ckpt), str(root), out=str(tmp_path / "w0.csv"), precision="fp32", num_workers=0, batch_size=3)
    main(str(ckpt), str(root), out=str(tmp_path / "w2.csv"), precision="fp32", num_workers=2, batch_size=3)
    a, b = read(tmp_path / "w0.csv"), read(tmp_path / "w2.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 12
    assert [r["pred"] for r in a] == [r["pred"] for r in b] and [r["error"] for r in a] == [r["error"] for r in b]
    torch.testing.assert_close(probs([r for r in a if r["pred"]]), probs([r for r in b if r["pred"]]), atol=1e-5,
                               rtol=0)
