"""bench/eurosat_mosaics.py on a synthetic EuroSAT folder: split purity, label sets, determinism, sizes, and the
refusal / replacement of an existing output folder."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["AnnualCrop", "Forest", "Highway", "River", "SeaLake"]
SPLIT_CSV = {"train": "train.csv", "val": "validation.csv", "test": "test.csv"}
PER_CLASS = 3


def _load():
    spec = importlib.util.spec_from_file_location("bench_eurosat_mosaics", REPO / "bench" / "eurosat_mosaics.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the worker pool pickles its functions by module name
    spec.loader.exec_module(mod)
    return mod


mosaics = _load()


def _color(split_index: int, class_index: int, j: int) -> tuple[int, int, int]:
    """A colour unique to each source patch, far enough from the others to be recognised after JPEG."""
    return 30 + 45 * class_index, 30 + 90 * split_index, 40 + 80 * j


@pytest.fixture
def fake_eurosat(tmp_path) -> Path:
    """EuroSAT layout: <Class>/<Class>_<n>.jpg, three CSVs (with EuroSAT's extra columns), label_map.json.
    Test patches are 80x80 (resized to 64x64 by the builder); the val split lacks the last class."""
    root = tmp_path / "eurosat"
    for s, (split, csv_name) in enumerate(SPLIT_CSV.items()):
        rows = []
        for c, name in enumerate(CLASSES):
            if split == "val" and c == len(CLASSES) - 1:
                continue
            for j in range(PER_CLASS):
                rel = f"{name}/{name}_{s}{j}.jpg"
                (root / name).mkdir(parents=True, exist_ok=True)
                size = 80 if split == "test" else 64
                Image.new("RGB", (size, size), _color(s, c, j)).save(root / rel, quality=100)
                rows.append([len(rows), rel, c, name])
        with open(root / csv_name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "Filename", "Label", "ClassName"])
            w.writerows(rows[::-1])  # CSV order must not matter
    (root / "label_map.json").write_text(json.dumps({n: i for i, n in enumerate(CLASSES)}))
    return root


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _identify(cell: np.ndarray) -> tuple[int, int, int]:
    """(split index, class index, j) of the source patch whose colour is nearest the cell's mean colour."""
    mean = cell.reshape(-1, 3).mean(0)
    candidates = [(s, c, j) for s in range(3) for c in range(len(CLASSES)) for j in range(PER_CLASS)]
    return min(candidates, key=lambda k: float(((np.array(_color(*k)) - mean) ** 2).sum()))


def test_split_purity_label_sets_and_sizes(fake_eurosat, tmp_path):
    out = tmp_path / "mosaics"
    written = mosaics.build_mosaics(out, fake_eurosat, "40,12,8", seed=3)
    assert written == {"train": 40, "val": 12, "test": 8}
    assert json.loads((out / "label_map.json").read_text()) == {n: i for i, n in enumerate(CLASSES)}
    label_counts = set()
    for s, split in enumerate(SPLIT_CSV):
        rows = _read_csv(out / f"{split}.csv")
        assert len(rows) == written[split] and list(rows[0]) == ["path", "labels"]
        assert len({r["path"] for r in rows}) == len(rows)
        for r in rows:
            assert r["path"].startswith(f"images/{split}/")
            labels = r["labels"].split("|")
            assert labels == sorted(labels, key=CLASSES.index) and len(set(labels)) == len(labels)
            im = Image.open(out / r["path"])
            assert im.size == (128, 128) and im.mode == "RGB" and im.format == "JPEG"
            a = np.asarray(im)
            cells = [_identify(a[y:y + 64, x:x + 64]) for y in (0, 64) for x in (0, 64)]
            assert {cs for cs, _, _ in cells} == {s}, f"{r['path']} mixes splits: {cells}"
            assert {CLASSES[c] for _, c, _ in cells} == set(labels)
            for y in (0, 64):  # each cell is one flat patch: no resize blur across cell borders
                for x in (0, 64):
                    assert np.ptp(a[y + 2:y + 62, x + 2:x + 62].astype(int), axis=(0, 1)).max() <= 6
            label_counts.add(len(labels))
            if split == "val":
                assert "SeaLake" not in labels
    assert label_counts == {1, 2, 3, 4}
    assert sorted(p.name for p in out.iterdir()) == ["images", "label_map.json", "mosaics.json", "test.csv",
                                                      "train.csv", "val.csv"]
    assert not list(tmp_path.glob(".mosaics.*"))  # no partial folder left behind


def _digest(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_deterministic_from_seed_and_independent_of_workers(fake_eurosat, tmp_path):
    mosaics.build_mosaics(tmp_path / "a", fake_eurosat, "30,6,6", seed=7)
    a = _digest(tmp_path / "a")
    mosaics.CHUNK, chunk = 7, mosaics.CHUNK  # several work items per split
    try:
        mosaics.build_mosaics(tmp_path / "b", fake_eurosat, "30,6,6", seed=7, workers=2)
    finally:
        mosaics.CHUNK = chunk
    assert _digest(tmp_path / "b") == a
    mosaics.build_mosaics(tmp_path / "c", fake_eurosat, "30,6,6", seed=8)
    assert (tmp_path / "c" / "train.csv").read_bytes() != a["train.csv"]
    # the first mosaics do not depend on how many are built
    mosaics.build_mosaics(tmp_path / "d", fake_eurosat, "10,6,6", seed=7)
    assert _read_csv(tmp_path / "d" / "train.csv") == _read_csv(tmp_path / "a" / "train.csv")[:10]


def test_cells_follow_the_rule():
    pools = [[Path(f"{c}_{j}") for j in range(4)] for c in range(len(CLASSES))]  # enough for 4 distinct
    ks = []
    for i in range(400):
        cells = mosaics.mosaic_cells(pools, 0, 0, i)
        assert len(cells) == 4 and all(p.name.startswith(f"{c}_") for c, p in cells)
        per_class = {c: [p for cc, p in cells if cc == c] for c, _ in cells}
        assert all(len(set(ps)) == len(ps) for ps in per_class.values())  # distinct patches within a class
        ks.append(len(per_class))
    assert mosaics.mosaic_cells(pools, 0, 0, 5) == mosaics.mosaic_cells(pools, 0, 0, 5)
    counts = np.bincount(ks, minlength=5)[1:]
    assert counts.min() > 70  # k uniform in 1..4 (100 expected each)


def test_unknown_class_and_bad_counts_are_user_errors(fake_eurosat, tmp_path):
    with open(fake_eurosat / "test.csv", "a") as f:
        f.write("99,Forest/x.jpg,1,Forst\n")
    with pytest.raises(mosaics.DataError, match=r"test.csv: row \d+: class 'Forst'"):
        mosaics.build_mosaics(tmp_path / "m", fake_eurosat, "2,2,2")
    with pytest.raises(mosaics.ConfigError, match="--counts"):
        mosaics.build_mosaics(tmp_path / "m", fake_eurosat, "2,2")
    assert not (tmp_path / "m").exists()


def test_cli_refuses_non_empty_out_and_overwrite_replaces_it(fake_eurosat, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    stale = tmp_path / ".m.partial-999999999"  # a killed run's leftovers (no such pid)
    (stale / "images").mkdir(parents=True)
    cmd = [sys.executable, str(REPO / "bench" / "eurosat_mosaics.py"), "--out", str(out), "--root", str(fake_eurosat),
           "--counts", "3,2,1", "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "--overwrite" in r.stderr
    assert (out / "keep.txt").exists()
    r = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and len(_read_csv(out / "train.csv")) == 3
    assert not stale.exists() and not list(tmp_path.glob(".m.*"))
