"""Build "EuroSAT mosaics", a real multi-label dataset: each image is a 2x2 mosaic of four EuroSAT patches.

    python bench/eurosat_mosaics.py --out /tmp/eurosat_mosaics [--root ../shared/data/eurosat]
                                    [--counts 20000,4000,2000] [--seed 0] [--workers 1] [--overwrite]
    python bench/eurosat_mosaics.py --out /tmp/mosaics_small --counts 200,40,20      # a small set

Source (``--root``): EuroSAT's ``train.csv``, ``validation.csv`` and ``test.csv`` (columns ``Filename``, a path
relative to the CSV's folder, and ``ClassName``) and ``label_map.json`` (class name -> index).

Each mosaic is 128x128: four 64x64 patches (a patch of another size is resized to 64x64, bicubic) in row-major
order. The four patches come from the mosaic's own split only: train mosaics from ``train.csv``, val from
``validation.csv``, test from ``test.csv``, so no patch is shared between splits. Within a split a patch may
appear in several mosaics (20,000 train mosaics use 80,000 patch slots).

Sampling rule, mosaic ``i`` of split ``s`` (its own generator, ``numpy.random.default_rng([seed, s, i])``, so
the result does not depend on ``--workers`` or on the order of work):

1. ``k``, the number of distinct classes, uniform in 1..min(4, classes in the split);
2. ``k`` distinct classes, uniformly without replacement;
3. the four cells: each chosen class once, the ``4 - k`` other cells a chosen class drawn uniformly (with
   replacement), then the four cells shuffled;
4. for each class, its patches uniformly from that class's patches of the split (distinct within a mosaic
   when the class has enough).

The label set is the ``k`` classes present, so 1-4 labels per image, about 2.5 on average.

Output (``--out DIR``): ``DIR/images/{train,val,test}/<split>_<i:06d>.jpg`` (JPEG quality ``--quality``,
default 95, 4:4:4 chroma), ``DIR/{train,val,test}.csv`` with columns ``path,labels`` (``path`` relative to
DIR, ``labels`` the class names joined by ``|`` in label-map order), ``DIR/label_map.json`` (the source's),
and ``DIR/mosaics.json`` (seed, counts, quality, this rule's version). The same source, seed, counts and
quality give byte-identical files.

Restartable: everything is written to ``.<DIR name>.partial-<pid>`` next to DIR and renamed to DIR at the end,
so DIR only ever holds a complete set; a partial folder of a killed run is removed by the next run. A non-empty
DIR is refused unless ``--overwrite`` (it is then replaced after the new set is complete). A user error (bad
``--counts``, missing or malformed source file, unknown class) is one line and exit status 2.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.config.fields import ConfigError
from trainer.data.listing import DataError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "eurosat"
SPLITS = (("train", "train.csv"), ("val", "validation.csv"), ("test", "test.csv"))
DEFAULT_COUNTS = (20_000, 4_000, 2_000)
PATCH = 64
CELLS = 4  # 2 x 2
RULE_VERSION = 1
CHUNK = 250  # mosaics per work item with --workers > 1

_ctx: dict = {}  # per-process build context: {"pools": {split: [[Path, ...] per class]}, "tmp": Path, ...}


def parse_counts(counts) -> tuple[int, int, int]:
    """``"200,40,20"`` (or a 3-sequence) -> ``(train, val, test)`` mosaic counts, each >= 0.

    Raises:
        ConfigError: not three non-negative integers.
    """
    parts = counts.split(",") if isinstance(counts, str) else list(counts)
    try:
        values = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise ConfigError(f"--counts must be three integers >= 0, train,val,test (e.g. 200,40,20), got {counts!r}")
    return values


def read_label_map(root: Path) -> dict[str, int]:
    """``root/label_map.json`` as ``{class name: index}`` with indices 0..C-1. Raises DataError if malformed
    (FileNotFoundError if missing)."""
    path = root / "label_map.json"
    try:
        label_map = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if (not isinstance(label_map, dict) or not label_map
            or sorted(label_map.values()) != list(range(len(label_map)))):
        raise DataError(f"{path}: expected a non-empty {{class name: index}} map with indices 0..C-1")
    return label_map


def read_split(csv_path: Path, label_map: dict[str, int]) -> list[list[Path]]:
    """The patches of one split grouped by class: ``pools[c]`` = sorted paths of class index c (maybe empty).

    Raises:
        DataError: no ``Filename`` / ``ClassName`` column, a class missing from the label map (naming the
            row), or no rows. FileNotFoundError: no such CSV.
    """
    pools: list[list[Path]] = [[] for _ in label_map]
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Filename", "ClassName"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {sorted(missing)} (need Filename, ClassName)")
        for row_number, row in enumerate(reader, start=2):
            name = row["ClassName"]
            if name not in label_map:
                raise DataError(f"{csv_path}: row {row_number}: class {name!r} is not in label_map.json")
            pools[label_map[name]].append(csv_path.parent / row["Filename"])
    if not any(pools):
        raise DataError(f"{csv_path}: no rows")
    return [sorted(p) for p in pools]


def mosaic_cells(pools: list[list[Path]], seed: int, split_index: int, i: int) -> list[tuple[int, Path]]:
    """The four ``(class index, patch path)`` cells of mosaic ``i`` of a split, row-major (rule in the module
    docstring). Depends only on the arguments."""
    rng = np.random.default_rng([seed, split_index, i])
    classes = [c for c, pool in enumerate(pools) if pool]
    k = int(rng.integers(1, min(CELLS, len(classes)) + 1))
    chosen = [int(c) for c in rng.choice(classes, size=k, replace=False)]
    cells = chosen + [int(c) for c in rng.choice(chosen, size=CELLS - k, replace=True)]
    rng.shuffle(cells)
    picked: dict[int, list[Path]] = {}
    for c in sorted(set(cells)):
        n, pool = cells.count(c), pools[c]
        picked[c] = [pool[j] for j in rng.choice(len(pool), size=n, replace=n > len(pool))]
    return [(c, picked[c].pop()) for c in cells]


def _patch(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
    return im if im.size == (PATCH, PATCH) else im.resize((PATCH, PATCH), Image.Resampling.BICUBIC)


def _build_range(split: str, split_index: int, start: int, stop: int) -> list[tuple[str, str]]:
    """Write mosaics ``start..stop-1`` of ``split`` into the partial folder; return their ``(path, labels)``."""
    pools, names = _ctx["pools"][split], _ctx["names"]
    rows = []
    for i in range(start, stop):
        cells = mosaic_cells(pools, _ctx["seed"], split_index, i)
        canvas = Image.new("RGB", (2 * PATCH, 2 * PATCH))
        for cell, (_, path) in enumerate(cells):
            canvas.paste(_patch(path), ((cell % 2) * PATCH, (cell // 2) * PATCH))
        rel = f"images/{split}/{split}_{i:06d}.jpg"
        canvas.save(_ctx["tmp"] / rel, quality=_ctx["quality"], subsampling=0)
        rows.append((rel, "|".join(names[c] for c in sorted({c for c, _ in cells}))))
    return rows


def _init_worker(ctx: dict) -> None:
    _ctx.clear()
    _ctx.update(ctx)


def _run_range(args) -> list[tuple[str, str]]:
    return _build_range(*args)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def build_mosaics(out: str | Path, root: str | Path = DEFAULT_ROOT, counts=DEFAULT_COUNTS, seed: int = 0,
                  quality: int = 95, workers: int = 1, overwrite: bool = False) -> dict[str, int]:
    """Build the mosaic set into ``out`` (layout, sampling rule and guarantees in the module docstring).

    Args:
        out: output folder; must be missing or empty unless ``overwrite``.
        root: EuroSAT folder with ``train.csv``, ``validation.csv``, ``test.csv``, ``label_map.json``.
        counts: ``(train, val, test)`` mosaics or ``"train,val,test"``.
        seed: any integer >= 0; the whole set is a function of it (and of the source and ``quality``).
        quality: JPEG quality, 1-100.
        workers: processes writing images (1: this process).
        overwrite: replace a non-empty ``out`` (only once the new set is complete).

    Returns:
        ``{split: mosaics written}``.

    Raises:
        ConfigError: bad ``counts``, ``seed``, ``quality`` or ``workers``. FileExistsError: ``out`` not empty (or a
        file) without ``overwrite``. DataError / FileNotFoundError: a missing or malformed source file.
    """
    counts = parse_counts(counts)
    if int(seed) < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if not 1 <= int(quality) <= 100:
        raise ConfigError(f"--quality must be in 1..100, got {quality}")
    if int(workers) < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    root, out = Path(root), Path(out).absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"--out {out} exists and is not an empty folder; pass --overwrite to replace it")
    label_map = read_label_map(root)
    names = sorted(label_map, key=label_map.get)
    pools = {split: read_split(root / csv_name, label_map) for split, csv_name in SPLITS}

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ctx = {"pools": pools, "names": names, "seed": int(seed), "quality": int(quality), "tmp": tmp}
    try:
        for split, _ in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
        jobs = [(split, s, start, min(start + CHUNK, n)) for s, ((split, _), n) in enumerate(zip(SPLITS, counts))
                for start in range(0, n, CHUNK)]
        if int(workers) == 1:
            _init_worker(ctx)
            results = [_run_range(job) for job in jobs]
        else:
            with multiprocessing.get_context("fork").Pool(int(workers), _init_worker, (ctx,)) as pool:
                results = pool.map(_run_range, jobs, chunksize=1)
        rows: dict[str, list] = {split: [] for split, _ in SPLITS}
        for (split, *_), part in zip(jobs, results):
            rows[split].extend(part)
        for split, _ in SPLITS:
            with open(tmp / f"{split}.csv", "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["path", "labels"])
                writer.writerows(rows[split])
        (tmp / "label_map.json").write_text(json.dumps({n: label_map[n] for n in names}, indent=2) + "\n")
        info = {"rule_version": RULE_VERSION, "seed": int(seed), "quality": int(quality),
                "counts": dict(zip([s for s, _ in SPLITS], counts)), "patch": PATCH, "grid": "2x2"}
        (tmp / "mosaics.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        _ctx.clear()
        shutil.rmtree(tmp, ignore_errors=True)
    return {split: len(rows[split]) for split, _ in SPLITS}


def main(out: str, root: str = str(DEFAULT_ROOT), counts: str = "20000,4000,2000", seed: int = 0,
         quality: int = 95, workers: int = 1, overwrite: bool = False) -> None:
    """Build EuroSAT mosaics into OUT (see the module docstring); prints the mosaics written per split."""
    written = build_mosaics(out, root, counts, seed=seed, quality=quality, workers=workers, overwrite=overwrite)
    print(json.dumps({"out": str(Path(out).absolute()), **written}))


if __name__ == "__main__":
    from trainer.cli.errors import run_cli

    run_cli(main)
