"""launch/evaluate.py (issue 12 item 4): any checkpoint on one split of a folder, manifest or shards, through
the trainer's evaluate_checkpoint; same reports as the end-of-run test evaluation; class-name check."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.data_synth import write_class_tree
from tests.helpers.inprocess import make_checkpoint

REPO = Path(__file__).resolve().parents[1]

REPORTS = ("metrics.json", "per_class.csv", "confused_pairs.csv", "predictions.csv", "confusion_matrix.png",
           "per_class_accuracy.png", "mistakes.png")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "run" / "checkpoints" / "best")


def expected_top1(ckpt, files_and_labels):
    """Top-1 computed image by image with the checkpoint's own eval preprocessing (the reference)."""
    from trainer.data.decode import decode_image_bytes
    from trainer.data.transforms import build_transforms
    from trainer.checkpoint.inference import load_for_inference

    model, pre, _ = load_for_inference(ckpt)
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    imgs = torch.stack([tf(decode_image_bytes(Path(f).read_bytes())) for f, _ in files_and_labels])
    with torch.inference_mode():
        pred = model(imgs).argmax(1).tolist()
    return sum(p == y for p, (_, y) in zip(pred, files_and_labels)) / len(files_and_labels)


def run(ckpt, data, out, **kw):
    from launch.evaluate import main

    kw.setdefault("num_workers", 0)
    return main(str(ckpt), str(data), out_dir=str(out), **kw)


def check_reports(out, split, record):
    for name in REPORTS:  # the plots of val keep the run's validation names (confusion_matrix.png, ...)
        plain = split == "val" and name.endswith(".png")
        assert (out / "reports" / (name if plain else f"{split}_{name}")).is_file(), name
    saved = json.loads((out / "reports" / f"{split}_metrics.json").read_text())
    assert saved[f"{split}/top1"] == pytest.approx(record[f"{split}/top1"])
    with open(out / "reports" / f"{split}_per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["ants", "bees"]
    return rows


def test_class_folders_every_image_with_reports(ckpt, tmp_path, capsys):
    root = tmp_path / "imgs"
    paths = write_class_tree(root, {"ants": 3, "bees": 4}, seed=5)
    (root / "bees" / "broken.jpg").write_bytes(b"not an image")
    record = run(ckpt, root, tmp_path / "out")
    assert record["test/num_samples"] == 7
    labels = [(p, 0 if p.parent.name == "ants" else 1) for p in paths]
    assert record["test/top1"] == pytest.approx(expected_top1(ckpt, labels))
    rows = check_reports(tmp_path / "out", "test", record)
    assert [int(r["support"]) for r in rows] == [3, 4]
    assert not (tmp_path / "out" / ".shards-test").exists()  # the temporary shards are removed
    out = capsys.readouterr().out
    assert "test/top1" in out and "1 unreadable file(s) not evaluated" in out and "bees" in out


@pytest.mark.slow
def test_split_folders_pick_the_split_and_default_out_dir(ckpt, tmp_path):
    root = tmp_path / "ds"
    write_class_tree(root / "train", {"ants": 2, "bees": 2})
    val = write_class_tree(root / "val", {"ants": 2, "bees": 3}, seed=20)
    from launch.evaluate import main

    record = main(str(ckpt), str(root), split="val", num_workers=0)
    assert record["val/num_samples"] == 5
    assert record["val/top1"] == pytest.approx(expected_top1(ckpt, [(p, int(p.parent.name == "bees")) for p in val]))
    check_reports(ckpt.parent.parent / "eval-val", "val", record)  # <run>/eval-<split>, not the run's reports/


@pytest.mark.slow
def test_manifests_with_and_without_split_column(ckpt, tmp_path):
    root = tmp_path / "m"
    paths = write_class_tree(root / "img", {"ants": 3, "bees": 3}, seed=40)
    rows = [(p.relative_to(root).as_posix(), p.parent.name) for p in paths]
    (root / "test.csv").write_text("Filename,Label\n" + "".join(f"{f},{c}\n" for f, c in rows))
    record = run(ckpt, root / "test.csv", tmp_path / "o1", path_column="Filename", label_column="Label")
    assert record["test/num_samples"] == 6
    ref = expected_top1(ckpt, [(p, int(p.parent.name == "bees")) for p in paths])
    assert record["test/top1"] == pytest.approx(ref)
    split = ["train", "test", "train", "test", "test", "train"]
    (root / "all.jsonl").write_text("".join(json.dumps({"path": f, "label": c, "split": s}) + "\n"
                                            for (f, c), s in zip(rows, split)))
    record = run(ckpt, root / "all.jsonl", tmp_path / "o2")
    chosen = [(p, int(p.parent.name == "bees")) for p, s in zip(paths, split) if s == "test"]
    assert record["test/num_samples"] == 3 and record["test/top1"] == pytest.approx(expected_top1(ckpt, chosen))


@pytest.mark.slow
def test_shards_by_folder_and_by_spec_with_meta(ckpt, tmp_path):
    from trainer.data.listing import list_split_folders
    from trainer.data.shard_writer import write_listing

    root = tmp_path / "ds"
    write_class_tree(root / "train", {"ants": 2, "bees": 2})
    write_class_tree(root / "val", {"ants": 1, "bees": 1}, seed=9)
    test = write_class_tree(root / "test", {"ants": 3, "bees": 2}, seed=30)
    write_listing(list_split_folders(root), tmp_path / "shards", max_samples_per_shard=2)
    ref = expected_top1(ckpt, [(p, int(p.parent.name == "bees")) for p in test])
    a = run(ckpt, tmp_path / "shards", tmp_path / "o1")
    b = run(ckpt, str(tmp_path / "shards" / "test-*.tar"), tmp_path / "o2", meta=str(tmp_path / "shards/dataset.json"),
            batch_size=2)
    assert a["test/num_samples"] == b["test/num_samples"] == 5
    assert a["test/top1"] == pytest.approx(ref) and b["test/top1"] == pytest.approx(ref)
    assert a["test/loss"] == pytest.approx(b["test/loss"], abs=1e-5)


@pytest.mark.slow
def test_kept_shard_dir_is_reused_and_a_changed_source_refused(ckpt, tmp_path):
    from trainer.config.fields import ConfigError

    root = tmp_path / "imgs"
    write_class_tree(root, {"ants": 2, "bees": 2})
    run(ckpt, root, tmp_path / "o", shard_dir=str(tmp_path / "keep"))
    first = (tmp_path / "keep/dataset.json").stat().st_mtime_ns
    run(ckpt, root, tmp_path / "o", shard_dir=str(tmp_path / "keep"))
    assert (tmp_path / "keep/dataset.json").stat().st_mtime_ns == first
    write_class_tree(root, {"ants": 3}, prefix="new")
    with pytest.raises(ConfigError, match="--shard_dir"):
        run(ckpt, root, tmp_path / "o", shard_dir=str(tmp_path / "keep"))


def test_other_class_names_exit_2_with_one_line_naming_the_files(ckpt, tmp_path, capfd):
    from launch.evaluate import main

    from trainer.cli.errors import run_cli

    root = tmp_path / "imgs"
    write_class_tree(root, {"ants": 2, "wasps": 2})
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv=["--checkpoint", str(ckpt), "--data", str(root), "--num_workers", "0",
                            "--out_dir", str(tmp_path / "o")])
    err = capfd.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert str(root) in err and str(ckpt / "model.json") in err and "wasps" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_command_line_with_loader_workers(ckpt, tmp_path):
    root = tmp_path / "ds"
    write_class_tree(root / "train", {"ants": 2, "bees": 2})
    write_class_tree(root / "val", {"ants": 1, "bees": 1}, seed=3)
    test = write_class_tree(root / "test", {"ants": 4, "bees": 4}, seed=50)
    r = subprocess.run([sys.executable, "launch/evaluate.py", "--checkpoint", str(ckpt), "--data", str(root),
                        "--num_workers", "2", "--batch_size", "3", "--out_dir", str(tmp_path / "o")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = expected_top1(ckpt, [(p, int(p.parent.name == "bees")) for p in test])
    assert f"test/top1 {ref:.4f}" in r.stdout and "8 samples" in r.stdout
    check_reports(tmp_path / "o", "test", json.loads((tmp_path / "o/reports/test_metrics.json").read_text()))
