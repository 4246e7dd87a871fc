"""Predict speed: the previous ``launch/predict.py`` (commit bef5517, decoding in the main process, one
image after the other) against today's (DataLoader workers, channels_last), side by side in one run.

    python bench/predict.py --checkpoint /tmp/run/checkpoints/best --images ../shared/data/hymenoptera_data/val

The previous implementation is taken from git (``git show bef5517:launch/predict.py``) into a temp file
and imported, so the baseline is exactly the code that shipped. Each round runs old then new (whole
``main()`` calls: model load, listing, decoding, forward, CSV), ``--rounds`` times alternating so that
load from other processes hits both alike; images/s use the fastest round of each. Then the two CSVs are
compared row by row (by path): same predicted class, top-1 probability within ``--atol``, the same
unreadable files. Exit status 1 if the predictions differ.

The new predict runs at ``--precision`` (default ``auto``: bfloat16 autocast where the hardware computes
it natively, ``launch/predict.py``'s ``resolve_precision``; the old one always ran float32). ``--atol``
defaults to 1e-5 when that resolves to fp32 and 5e-2 for bf16 (8 mantissa bits, through the whole
network: 0.028 at most on the 153 ants/bees val images); the largest top-1 probability difference is
printed either way.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE_COMMIT = "bef5517"


def load_baseline(tmp: Path):
    """The module ``launch/predict.py`` of :data:`BASELINE_COMMIT`, imported from a temp file."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:launch/predict.py"], check=True,
                         capture_output=True, text=True).stdout
    path = tmp / "predict_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("predict_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def compare(old: dict[str, dict], new: dict[str, dict], atol: float) -> list[str]:
    """Differences between two prediction CSVs (empty list: identical within ``atol``)."""
    problems = []
    if set(old) != set(new):
        problems.append(f"different files: {len(set(old) ^ set(new))} path(s) in only one CSV")
    for path in sorted(set(old) & set(new)):
        a, b = old[path], new[path]
        if a["pred"] != b["pred"] or a["true"] != b["true"]:
            problems.append(f"{path}: pred {a['pred']!r} vs {b['pred']!r}, true {a['true']!r} vs {b['true']!r}")
        elif a["pred"] and abs(float(a["prob"]) - float(b["prob"])) > atol:
            problems.append(f"{path}: prob {a['prob']} vs {b['prob']}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", default=str(REPO.parent / "shared/data/hymenoptera_data/val"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--num_workers", type=int, default=None, help="new predict's workers (default: its own)")
    ap.add_argument("--precision", default="auto", help="new predict's --precision (auto, fp32, bf16)")
    ap.add_argument("--atol", type=float, default=None, help="top-1 probability tolerance (default: 1e-5 fp32, "
                                                              "5e-2 bf16)")
    args = ap.parse_args()

    import torch

    from launch import predict as new

    precision = new.resolve_precision(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    atol = args.atol if args.atol is not None else (1e-5 if precision == "fp32" else 5e-2)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as d:
        tmp = Path(d)
        old = load_baseline(tmp)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            new_kw = {"num_workers": args.num_workers, "precision": precision}
            for name, fn, kw in (("old", old.main, {}), ("new", new.main, new_kw)):
                t = time.perf_counter()
                fn(args.checkpoint, args.images, out=str(tmp / f"{name}.csv"), batch_size=args.batch_size, **kw)
                times[name].append(time.perf_counter() - t)
        rows = {k: read_rows(tmp / f"{k}.csv") for k in times}
        problems = compare(rows["old"], rows["new"], atol)
        both = [p for p in rows["new"] if rows["new"][p]["pred"] and rows["old"].get(p, {}).get("pred")]
        max_diff = max((abs(float(rows["new"][p]["prob"]) - float(rows["old"][p]["prob"])) for p in both),
                       default=0.0)
    n = len(rows["new"])
    ips = {k: n / min(v) for k, v in times.items()}
    print(f"\n{n} images ({sum(1 for r in rows['new'].values() if not r['pred'])} unreadable), "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"CUDA {torch.cuda.is_available()}, load average {os.getloadavg()[0]:.1f}, batch {args.batch_size}, "
          f"new workers {args.num_workers if args.num_workers is not None else new.default_workers()}, "
          f"new precision {precision} (old: fp32)")
    for k in ("old", "new"):
        print(f"  {k}: {ips[k]:6.1f} images/s (fastest of {args.rounds}; every round: "
              f"{', '.join(f'{t:.2f}' for t in times[k])} s)")
    print(f"  ratio new/old: {ips['new'] / ips['old']:.2f}x")
    if problems:
        print(f"predictions DIFFER in {len(problems)} row(s), e.g.:\n  " + "\n  ".join(problems[:5]))
        return 1
    print(f"predictions identical: same class and unreadable files for all {n} rows; top-1 probability within "
          f"{atol:g} (largest difference {max_diff:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
