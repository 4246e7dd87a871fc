"""``finetune predict`` and ``finetune export`` of a multi-label checkpoint (issue 26): sigmoid probabilities, the
saved per-class thresholds or ``--threshold``, label sets in the CSV, exact-set accuracy equal to evaluate's,
TorchScript / ONNX graphs ending in the sigmoid, and one-line errors for a bad threshold or an unknown label.

The checkpoint is the smallest there is: ``timm:test_efficientnet`` (random weights, no download) at 32 px with a
seeded head, ``data.task: multilabel`` with ``data.label_delimiter: ';'``, and per-class thresholds set between the
median probabilities of the test images (so the predicted sets differ from image to image)."""

from __future__ import annotations

import csv
import io
import json
import warnings

import numpy as np
import pytest
import torch
from helpers.fake_accelerator import CpuAccelerator
from PIL import Image

CLASSES = ["boat", "car", "sky", "tree"]  # the manifest's labels, sorted: the class map
DELIM = ";"
N_TEST = 14


class MainAccelerator(CpuAccelerator):
    """The CPU stand-in (no autocast: float32) as the main (only) process."""

    is_main_process = True
    process_index = 0


def _png(i: int) -> bytes:
    """A 28 x 24 RGB noise image (not mirror-symmetric, so a flip changes the model's output)."""
    arr = np.random.default_rng(1000 + i).integers(0, 256, (24, 28, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _label_set(i: int) -> list[str]:
    keep = np.random.default_rng(i).random(len(CLASSES)) < 0.45
    return [c for c, k in zip(CLASSES, keep) if k]


def _write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _read(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _save(path, model, pre: dict, thresholds, **data) -> str:
    from trainer.config.schema import Config
    from trainer.checkpoint import inference as inference_checkpoint

    cfg = Config().to_dict()
    cfg["model"]["backbone"] = "timm:test_efficientnet"
    cfg["data"].update(data)
    return str(inference_checkpoint.save(path, model.state_dict(), class_names=CLASSES, backbone="timm:test_efficientnet",
                                         drop_rate=0.0, preprocessing=pre, config=cfg, metrics={"epoch": 0, "step": 0},
                                         extra={"thresholds": thresholds} if thresholds is not None else None))


def reference(ckpt: str, files) -> torch.Tensor:
    """(N, C) float32 sigmoid probabilities image by image with the checkpoint's eval preprocessing."""
    from trainer.data.decode import decode_image_bytes
    from trainer.data.transforms import build_transforms
    from trainer.checkpoint.inference import load_for_inference

    model, pre, _ = load_for_inference(ckpt)
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    with torch.inference_mode():
        return torch.cat([model(tf(decode_image_bytes(f.read_bytes()))[None]).float().sigmoid() for f in files])


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    """``{root, ckpt, csv (test list with label sets), shards (test shard paths), files (test images), truth (their
    label sets), thresholds, model, pre}``. Every other test image is labelled with the set the model predicts for
    it (so the exact-set accuracy is neither 0 nor 1), the others with random sets."""
    from trainer.data.manifest import list_manifest
    from trainer.data.meta import read_meta
    from trainer.data.shard_writer import write_listing
    from trainer.models.build import build_model

    root = tmp_path_factory.mktemp("ml")
    (root / "img").mkdir()
    rels = [f"img/{i:03d}.png" for i in range(12 + N_TEST)]
    for i, rel in enumerate(rels):
        (root / rel).write_bytes(_png(i))
    files = [root / rel for rel in rels[12:]]

    torch.manual_seed(0)
    model, pre = build_model("timm:test_efficientnet", len(CLASSES), "none")
    with torch.no_grad():
        model.head.weight.normal_(0, 30.0)  # logits of a few units: probabilities spread over (0, 1)
        model.head.bias.zero_()
    pre = {**pre.to_dict(), "input_size": 32, "crop_pct": 1.0}
    plain = _save(root / "plain" / "best", model, pre, None, task="multilabel", label_delimiter=DELIM)
    probs = reference(plain, files)
    # float32 values, as thresholds chosen by a run are
    thresholds = torch.quantile(probs.double(), 0.5, dim=0, interpolation="midpoint").float().tolist()
    predicted = [[c for c, p, t in zip(CLASSES, row.tolist(), thresholds) if p >= t] for row in probs]
    ckpt = _save(root / "run" / "checkpoints" / "best", model, pre, thresholds, task="multilabel",
                 label_delimiter=DELIM)

    rows, test_rows = [["path", "labels", "split"]], [["path", "labels"]]
    for i, rel in enumerate(rels):
        split = "train" if i < 8 else "val" if i < 12 else "test"
        labels = CLASSES if i == 0 else predicted[i - 12] if split == "test" and i % 2 else _label_set(i)
        rows.append([rel, DELIM.join(labels), split])  # row 0: every class has a training row
        if split == "test":
            test_rows.append([rel, DELIM.join(labels)])
    _write_csv(root / "all.csv", rows)
    _write_csv(root / "test.csv", test_rows)
    listing = list_manifest(str(root / "all.csv"), task="multilabel", label_delimiter=DELIM)
    write_listing(listing, root / "shards", max_samples_per_shard=8)
    meta = read_meta(root / "shards")
    assert meta.classes == CLASSES
    truth = [set(r[1].split(DELIM)) - {""} for r in test_rows[1:]]
    return {"root": root, "ckpt": ckpt, "csv": str(root / "test.csv"), "shards": meta.shard_urls("test"),
            "files": files, "truth": truth, "thresholds": thresholds, "model": model, "pre": pre}


def _sets(rows, column: str) -> list[set]:
    return [set(r[column].split(DELIM)) - {""} for r in rows]


def test_predict_reproduces_evaluates_exact_set_accuracy(ml, tmp_path):
    from launch.predict import main
    from trainer.train.evaluation import evaluate_checkpoint

    acc = main(ml["ckpt"], ml["csv"], out=str(tmp_path / "p.csv"), batch_size=5, num_workers=0, device="cpu",
               precision="fp32")
    _, record = evaluate_checkpoint(ml["ckpt"], ml["shards"], accelerator=MainAccelerator(), split="test",
                                    micro_batch_size=4, num_workers=0)  # float32: the stand-in has no autocast
    assert record["test/num_samples"] == N_TEST
    assert 0.4 < acc < 1  # half the images carry the set the model predicts
    assert acc == pytest.approx(record["test/exact_set_accuracy"], abs=1e-12)
    rows = _read(tmp_path / "p.csv")
    assert list(rows[0]) == ["path", "true", "pred", "num_pred"] + [f"p_{c}" for c in CLASSES] + ["error"]
    assert _sets(rows, "true") == ml["truth"]
    # label sets are written in class order, joined with the checkpoint's delimiter
    assert all(r["true"] == DELIM.join(c for c in CLASSES if c in t) for r, t in zip(rows, ml["truth"]))
    pred = _sets(rows, "pred")
    assert [int(r["num_pred"]) for r in rows] == [len(p) for p in pred]
    assert len({frozenset(p) for p in pred}) > 2  # the thresholds split the images
    assert acc == pytest.approx(sum(p == t for p, t in zip(pred, ml["truth"])) / N_TEST)
    tp = sum(len(p & t) for p, t in zip(pred, ml["truth"]))
    wrong = sum(len(p ^ t) for p, t in zip(pred, ml["truth"]))
    assert record["test/f1_micro"] == pytest.approx(2 * tp / (2 * tp + wrong))

    # the same images as shards: labels from their labels.json, the same predictions
    shard_acc = main(ml["ckpt"], str(ml["root"] / "shards" / "test-*.tar"), out=str(tmp_path / "s.csv"),
                     num_workers=0, device="cpu", precision="fp32")
    srows = _read(tmp_path / "s.csv")
    names = [f"img/{f.name}" for f in ml["files"]]  # the shards store the names relative to the manifest
    assert shard_acc == acc and [r["path"] for r in srows] == names
    assert all(r["path"] == str(ml["root"] / n) for r, n in zip(rows, names))
    assert [(r["true"], r["pred"]) for r in srows] == [(r["true"], r["pred"]) for r in rows]
    # an image folder gives no label sets: no accuracy, empty true cells
    assert main(ml["ckpt"], str(ml["root"] / "img"), out=str(tmp_path / "f.csv"), num_workers=0, device="cpu",
                precision="fp32") is None
    assert all(r["true"] == "" and r["pred"] == DELIM.join(c for c in CLASSES if c in r["pred"].split(DELIM))
               for r in _read(tmp_path / "f.csv"))


def test_thresholds_saved_or_overridden_and_sets_are_binarized_probabilities(ml, tmp_path):
    from launch.predict import main
    from trainer.reporting.multilabel import binarize

    ref = reference(ml["ckpt"], ml["files"])
    sizes = {}
    for name, thr in (("saved", None), ("low", 0.001), ("high", 0.999)):
        out = tmp_path / f"{name}.csv"
        main(ml["ckpt"], ml["csv"], out=str(out), batch_size=4, num_workers=0, device="cpu", precision="fp32",
             threshold=thr)
        rows = _read(out)
        got = torch.tensor([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)
        assert bool(((got >= 0) & (got <= 1)).all())
        expected = binarize(ref, ml["thresholds"] if thr is None else thr)
        assert _sets(rows, "pred") == [{CLASSES[j] for j in range(len(CLASSES)) if e[j]} for e in expected]
        sizes[name] = sum(int(r["num_pred"]) for r in rows)
    assert sizes["high"] < sizes["saved"] < sizes["low"]

    # --tta: the mean of the sigmoids of the image and of its mirror image
    main(ml["ckpt"], ml["csv"], out=str(tmp_path / "tta.csv"), num_workers=0, device="cpu", precision="fp32", tta=True)
    from trainer.data.decode import decode_image_bytes
    from trainer.data.transforms import build_transforms
    from trainer.checkpoint.inference import load_for_inference

    model, pre, _ = load_for_inference(ml["ckpt"])
    tf = build_transforms(pre.input_size, train=False, crop_pct=pre.crop_pct, interpolation=pre.interpolation)
    imgs = torch.stack([tf(decode_image_bytes(f.read_bytes())) for f in ml["files"]])
    with torch.no_grad():
        expected = (model(imgs).sigmoid() + model(imgs.flip(3)).sigmoid()) / 2
    got = torch.tensor([[float(r[f"p_{c}"]) for c in CLASSES] for r in _read(tmp_path / "tta.csv")])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    assert not torch.allclose(got, ref, atol=1e-4)


def test_export_outputs_sigmoid_probabilities(ml, tmp_path):
    import onnxruntime as ort

    from launch.export import export
    from trainer.checkpoint.inference import load_for_inference

    result = export(ml["ckpt"], out_dir=str(tmp_path / "export"))
    assert max(result["max_abs_diff"].values()) < 1e-4
    model, pre, classes = load_for_inference(ml["ckpt"])
    x = torch.randn(3, 3, pre.input_size, pre.input_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = torch.sigmoid(model(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
            ts = torch.jit.load(str(result["torchscript"]))(x)
    sess = ort.InferenceSession(str(result["onnx"]), providers=["CPUExecutionProvider"])
    onnx = torch.from_numpy(sess.run(["probabilities"], {"images": x.numpy()})[0])  # batch 3 (exported with 1)
    assert ref.shape == (3, len(CLASSES)) and float(ref.max() - ref.min()) > 0.05
    for out in (ts, onnx):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        assert bool(((out >= 0) & (out <= 1)).all())
    spec = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert spec["task"] == "multilabel" and spec["outputs"] == "sigmoid probabilities"
    assert spec["thresholds"] == pytest.approx(ml["thresholds"]) and spec["label_delimiter"] == DELIM
    assert spec["output"]["name"] == "probabilities" and spec["class_names"] == classes == CLASSES


def _cli(argv, capfd) -> tuple[int, list[str]]:
    from launch.predict import main
    from trainer.cli.errors import run_cli

    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv=[str(a) for a in argv], prog="finetune predict")
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    return e.value.code, err


def test_bad_threshold_and_unknown_label_are_one_line_exit_2(ml, tmp_path, capfd):
    base = ["--checkpoint", ml["ckpt"], "--num_workers", "0", "--device", "cpu", "--precision", "fp32"]
    out = tmp_path / "p.csv"
    for bad in ("1.5", "0", "1"):
        code, err = _cli(base + ["--images", ml["csv"], "--out", out, "--threshold", bad], capfd)
        assert code == 2 and len(err) == 1 and "--threshold" in err[0] and "(0, 1)" in err[0], err
    rows = [["path", "labels"], ["img/012.png", "boat"], ["img/013.png", f"car{DELIM}submarine"]]
    _write_csv(ml["root"] / "bad.csv", rows)
    code, err = _cli(base + ["--images", ml["root"] / "bad.csv", "--out", out], capfd)
    assert code == 2 and len(err) == 1, err
    assert "bad.csv line 3" in err[0] and "'submarine'" in err[0] and "not a class" in err[0]
    assert not out.exists()  # refused before any prediction was written


def test_label_columns_checkpoint_reads_the_class_columns(ml, tmp_path, capfd):
    from launch.predict import main

    ckpt = _save(tmp_path / "cols" / "best", ml["model"], ml["pre"], ml["thresholds"], task="multilabel",
                 label_delimiter=DELIM, label_column=None, label_columns="rest")
    rows = [["file", "split"] + CLASSES]
    for f, t in zip(ml["files"], ml["truth"]):
        rows.append([f"img/{f.name}", "test"] + [int(c in t) for c in CLASSES])
    _write_csv(ml["root"] / "cols.csv", rows)
    acc = main(ckpt, str(ml["root"] / "cols.csv"), out=str(tmp_path / "c.csv"), num_workers=0, device="cpu",
               precision="fp32")
    got = _read(tmp_path / "c.csv")
    assert _sets(got, "true") == ml["truth"] and acc is not None
    plain = main(ml["ckpt"], ml["csv"], out=str(tmp_path / "p.csv"), num_workers=0, device="cpu", precision="fp32")
    assert acc == plain and [r["pred"] for r in got] == [r["pred"] for r in _read(tmp_path / "p.csv")]
    rows[2][3] = "yes"
    _write_csv(ml["root"] / "cols_bad.csv", rows)
    code, err = _cli(["--checkpoint", ckpt, "--images", ml["root"] / "cols_bad.csv", "--out", tmp_path / "x.csv",
                      "--num_workers", "0"], capfd)
    assert code == 2 and len(err) == 1 and "line 3" in err[0] and "'car'" in err[0] and "'yes'" in err[0], err


def test_single_label_checkpoint_refuses_threshold(ml, tmp_path, capfd):
    ckpt = _save(tmp_path / "single" / "best", ml["model"], ml["pre"], None, task="multiclass")
    code, err = _cli(["--checkpoint", ckpt, "--images", ml["csv"], "--out", tmp_path / "x.csv", "--threshold", "0.5",
                      "--num_workers", "0"], capfd)
    assert code == 2 and len(err) == 1 and "--threshold" in err[0] and "single-label" in err[0], err


def test_model_card_snippet_prints_a_label_set(ml, capsys):
    """The model card's timm snippet of a multi-label model runs as written (paths filled in) and prints the label
    set at the saved thresholds, not the single arg-max class."""
    import re
    from pathlib import Path

    card = (Path(ml["ckpt"]) / "README.md").read_text()
    assert "library_name: timm" in card and "argmax" not in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace("PATH/TO/THIS/FOLDER", str(ml["ckpt"])).replace("image.jpg", str(ml["files"][0]))
    exec(compile(code, "model_card_snippet", "exec"), {})
    printed = eval(capsys.readouterr().out.strip())
    assert isinstance(printed, list) and set(printed) <= set(CLASSES)
