"""``checkpoints/best/`` in timm's own format: ``timm.create_model("local-dir:<best>", pretrained=True)`` builds the
trained model (trainer/models/timm_format.py, trainer/checkpoint/inference.py), and the model card beside it
(trainer/reporting/model_card.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers.realdata import HYMENOPTERA, subset_folder

from trainer.checkpoint import inference as ic
from trainer.checkpoint.state import CheckpointError


def _timm_model(folder: Path):
    import timm

    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def _normalised(pre, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, pre.input_size, pre.input_size), generator=g, dtype=torch.uint8)
    return (images.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)


def _saved(folder: Path, backbone: str, classes: list[str], input_size: int | None = None, **config):
    """A random-weights classifier of ``backbone`` saved as an inference checkpoint with a run config."""
    import dataclasses

    from trainer.config.schema import Config
    from trainer.models.build import build_model

    torch.manual_seed(0)
    model, pre = build_model(backbone, len(classes), "none")
    if input_size:
        pre = model.preprocessing = dataclasses.replace(pre, input_size=input_size)
    with torch.no_grad():  # a head with logits well apart
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.1)
    cfg = Config().to_dict()
    cfg["model"]["backbone"] = backbone
    cfg["data"].update(shard_dir=str(folder / "no-shards"), **config)
    ic.save(folder, model.state_dict(), class_names=classes, backbone=backbone, drop_rate=0.0,
            preprocessing=pre.to_dict(), config=cfg, metrics={"epoch": 2, "step": 10, "val/top1": 0.75,
                                                              "val/loss": 0.5})
    return model.eval(), pre


@pytest.mark.parametrize("backbone, classifier, size", [
    ("timm:tf_efficientnet_lite0", "classifier", 64),  # the shipped default, trained at another input size
    ("timm:resnet18", "fc", 64),
    ("timm:convnext_atto", "head.fc", 64),  # a dotted classifier name
    ("timm:vit_tiny_patch16_224", "head", None),  # fixed input size
])
def test_timm_builds_the_saved_classifier_with_its_preprocessing(tmp_path, backbone, classifier, size):
    import timm
    from safetensors.torch import load_file

    classes = ["cat", "dog", "emu"]
    model, pre = _saved(tmp_path, backbone, classes, size)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["weights_keys"] == "timm" and meta["timm"] == {"architecture": backbone[5:], "classifier": classifier}
    m = _timm_model(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert set(stored) == set(m.state_dict())  # one weights file, in timm's names: loaded strictly
    assert all(torch.equal(stored[k], v) for k, v in m.state_dict().items())
    x = _normalised(pre)
    with torch.no_grad():
        torch.testing.assert_close(m(x), model(x), atol=1e-5, rtol=1e-5)
    data = timm.data.resolve_data_config({}, model=m)
    assert tuple(data["input_size"]) == (3, pre.input_size, pre.input_size)
    assert data["crop_pct"] == pre.crop_pct and data["interpolation"] == pre.interpolation
    assert tuple(data["mean"]) == pre.mean and tuple(data["std"]) == pre.std and data["crop_mode"] == "center"
    assert m.pretrained_cfg["label_names"] == classes and m.num_classes == 3
    # the trainer's own readers see the classifier's names
    loaded, pre2, names = ic.load_for_inference(tmp_path)
    assert names == classes and pre2 == pre
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_a_torchvision_backbone_keeps_the_trainer_format_and_says_why(tmp_path):
    model, pre = _saved(tmp_path, "resnet18", ["a", "b"])
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["weights_keys"] == "trainer" and "not a timm backbone" in meta["timm_unavailable"]
    assert not (tmp_path / "config.json").exists()
    card = (tmp_path / "README.md").read_text()
    assert "library_name: timm" not in card and "Not loadable with `timm.create_model`: resnet18 is not" in card
    loaded, _, _ = ic.load_for_inference(tmp_path)
    x = _normalised(pre, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_weights_that_are_not_the_timm_model_get_a_reason():
    from trainer.models.timm_format import timm_layout

    head = {"head.weight": torch.zeros(2, 512), "head.bias": torch.zeros(2)}
    layout, why = timm_layout("timm:resnet18", {"backbone.x": torch.zeros(1), **head}, 2, 224)
    assert layout is None and why.startswith("the weights are not timm's resnet18 with 2 classes (missing [")
    assert "unexpected ['x']" in why
    layout, why = timm_layout("timm:resnet18", {"w": torch.zeros(1), **head}, 2, 224)
    assert layout is None and "'w' is neither backbone.* nor the head" in why
    layout, why = timm_layout("timm:no_such_net", head, 2, 224)
    assert layout is None and "no_such_net" in why


def test_model_card_repair_and_unknown_weight_names(tmp_path):
    _saved(tmp_path, "timm:tf_efficientnet_lite0", ["cat", "dog"], 32, task="multiclass")
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "- image-classification" in card
    assert "`cat`, `dog`" in card and "| val/top1 | 0.75 |" in card and "Test metrics: none yet" in card
    assert "finetune train --config" in card and "input 32x32" in card and "images per split: not recorded" in card
    assert ic.write_model_card(tmp_path, test_metrics={"test/top1": 0.5, "test/loss": 0.25})
    card = (tmp_path / "README.md").read_text()
    assert "| test/top1 | 0.5 |" in card and "Test metrics: none yet" not in card
    # a kill after the weights: model.json, config.json and the card are rebuilt from the weights' header
    config = (tmp_path / "config.json").read_text()
    for name in ("model.json", "config.json", "README.md"):
        (tmp_path / name).unlink()
    assert ic.repair(tmp_path)
    assert (tmp_path / "config.json").read_text() == config and (tmp_path / "README.md").is_file()
    assert _timm_model(tmp_path).pretrained_cfg["label_names"] == ["cat", "dog"]
    meta = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "weights_keys": "onnx"}))
    with pytest.raises(CheckpointError, match=r"model.json: weights_keys 'onnx' is not timm or trainer"):
        ic.load_state(tmp_path)


# ---------------------------------------------------------------------------------------------
# a trained run, predicted with `finetune predict` and with timm alone
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"needs {HYMENOPTERA}")
    from helpers.inprocess import run_in_process

    import shutil

    root = tmp_path_factory.mktemp("timm_run")
    subset_folder(root / "images", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 4, "bees": 4}})
    for cls in ("ants", "bees"):  # a test split: 2 more training images of each class
        (root / "images" / "test" / cls).mkdir(parents=True)
        for p in sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[8:10]:
            shutil.copy(p, root / "images" / "test" / cls / p.name)
    run_in_process(root / "images", root / "shards", root / "run", **{"train.epochs": 2, "data.image_size": 96})
    return root, ic.best_dir(root / "run")


def _predict(folder: Path, images: Path, out: Path) -> list[dict]:
    from launch.predict import main

    main(str(folder), str(images), out=str(out), precision="fp32", num_workers=0)
    with open(out) as f:
        return [r for r in csv.DictReader(f) if r["pred"]]


@pytest.mark.slow
def test_timm_local_dir_gives_the_top1_of_finetune_predict(trained):
    import timm
    from PIL import Image

    root, best = trained
    images = root / "images" / "val"
    rows = _predict(best, images, root / "pred.csv")
    assert len(rows) == 8
    m = _timm_model(best)
    cfg = timm.data.resolve_data_config({}, model=m)
    pre = ic.read_model_meta(best)["preprocessing"]
    assert tuple(cfg["input_size"]) == (3, 96, 96) == (3, pre["input_size"], pre["input_size"])
    assert (cfg["crop_pct"], cfg["interpolation"], list(cfg["mean"]), list(cfg["std"])) == \
        (pre["crop_pct"], pre["interpolation"], pre["mean"], pre["std"])
    tf = timm.data.create_transform(**cfg)
    paths = [p if p.is_absolute() else images / p for p in (Path(r["path"]) for r in rows)]
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        probs = m(x).softmax(1)
    names = m.pretrained_cfg["label_names"]
    assert names == ["ants", "bees"]
    assert [names[i] for i in probs.argmax(1).tolist()] == [r["pred"] for r in rows]
    # PIL (timm) and the trainer's tensor decoding / resizing round pixels differently: close, not equal
    expected = torch.tensor([[float(r[f"p_{c}"]) for c in names] for r in rows])
    torch.testing.assert_close(probs, expected, atol=0.03, rtol=0)
    card = (best / "README.md").read_text()
    top1 = ic.read_model_meta(best)["metrics"]["val/top1"]
    assert "library_name: timm" in card and "`ants`, `bees`" in card
    assert "images per split: train 16, val 8, test 4" in card
    assert f"| val/top1 | {top1:.4f}".rstrip("0").rstrip(".") in card and "strategy `" in card
    test = json.loads((root / "run" / "reports" / "test_metrics.json").read_text())  # the end of the run
    assert f"| test/top1 | {test['test/top1']:.4f}".rstrip("0").rstrip(".") in card


@pytest.mark.slow
def test_an_older_folder_without_config_json_still_predicts_and_converts(trained, tmp_path):
    from safetensors.torch import save_file

    root, best = trained
    meta, state = ic.load_state(best)  # the classifier's names
    older = {k: v for k, v in meta.items() if k not in ("weights_keys", "timm", "timm_unavailable")}
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(old / "model.safetensors"),
              metadata={"format": ic.FORMAT, "write_id": older["write_id"]})
    (old / "model.json").write_text(json.dumps(older))
    images = root / "images" / "val"
    new_rows, old_rows = _predict(best, images, tmp_path / "new.csv"), _predict(old, images, tmp_path / "old.csv")
    assert old_rows == new_rows and len(old_rows) == 8
    with pytest.raises(FileNotFoundError, match="config.json"):
        _timm_model(old)
    ic.convert(old)
    assert json.loads((old / "model.json").read_text())["weights_keys"] == "timm"
    assert _predict(old, images, tmp_path / "converted.csv") == new_rows
    assert _timm_model(old).pretrained_cfg["label_names"] == ["ants", "bees"]
