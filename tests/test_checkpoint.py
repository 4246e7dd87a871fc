"""Checkpoint mechanics: atomic writes, name-matched optimizer state, truncated files."""

import os

import pytest
import torch

from trainer.checkpoint import state as ck
from trainer.checkpoint.files import latest_checkpoint


def _model_and_opt(order):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    named = dict(m.named_parameters())
    groups = [{"params": [named[n] for n in names], "name": gname, "lr": 0.1}
              for gname, names in order]
    opt = torch.optim.AdamW(groups)
    return m, opt, {id(p): n for n, p in named.items()}


def test_optimizer_state_matched_by_name_across_group_order():
    order_a = [("w", ["0.weight", "1.weight"]), ("b", ["0.bias", "1.bias"])]
    m, opt, names = _model_and_opt(order_a)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    saved = ck.optimizer_state_by_name(opt, names)
    # same groups, listed in another order: state must follow the names, not the positions
    order_b = [("b", ["1.bias", "0.bias"]), ("w", ["1.weight", "0.weight"])]
    m2, opt2, names2 = _model_and_opt(order_b)
    ck.load_optimizer_state_by_name(opt2, saved, names2)
    by_name_1 = {names[id(p)]: s for p, s in opt.state.items()}
    by_name_2 = {names2[id(p)]: s for p, s in opt2.state.items()}
    assert by_name_1.keys() == by_name_2.keys()
    for n in by_name_1:
        assert torch.equal(by_name_1[n]["exp_avg"], by_name_2[n]["exp_avg"])
    with pytest.raises(ck.CheckpointError, match="groups differ"):
        _, opt3, names3 = _model_and_opt([("all", ["0.weight", "1.weight", "0.bias", "1.bias"])])
        ck.load_optimizer_state_by_name(opt3, saved, names3)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.pt"
    ck.atomic_save({"format_version": ck.FORMAT_VERSION, "x": 1}, target)
    assert ck.load(target)["x"] == 1

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({"format_version": ck.FORMAT_VERSION, "x": 2}, target)
    monkeypatch.undo()
    assert ck.load(target)["x"] == 1  # the previous complete checkpoint is intact
    assert sorted(os.listdir(target.parent)) == ["last.pt"]
    assert latest_checkpoint(tmp_path) == target


def test_truncated_checkpoint_names_the_file(tmp_path):
    target = tmp_path / "last.pt"
    ck.atomic_save({"format_version": ck.FORMAT_VERSION, "w": torch.randn(1000)}, target)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=str(target)):
        ck.load(target)


class _Payload:
    """Pickles as a call of ``os.system`` (what a crafted checkpoint would carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_checkpoint_with_code_payload_is_refused_and_never_runs(tmp_path, how):
    import pickle
    import sys

    from trainer.checkpoint.inference import load_for_inference

    marker = tmp_path / "payload_ran"
    path = tmp_path / "best.pt"
    evil = {"format_version": ck.FORMAT_VERSION, "model": {"w": torch.zeros(1)}, "x": _Payload(marker)}
    with open(path, "wb") as f:
        torch.save(evil, f) if how == "torch.save" else pickle.dump(evil, f)
    for loader in (ck.load, load_for_inference):
        with pytest.raises(ck.CheckpointError) as e:
            loader(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "refused" in msg, msg
    assert not marker.exists()
    if how != "torch.save":
        return
    # and through the user-facing script: one line, exit 2, no traceback, payload not run
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "launch/predict.py", "--checkpoint", str(path), "--images", str(tmp_path),
                        "--out", str(tmp_path / "p.csv")], cwd=repo, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [f"error: {msg}"], p.stderr
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_pickle_payload_is_live(tmp_path):
    """The payload of the test above does run when unpickled without the weights-only guard."""
    import pickle

    marker = tmp_path / "payload_ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # noqa: S301
    assert marker.exists()



def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian in the python state
    path = tmp_path / "last.pt"
    ck.atomic_save({"format_version": ck.FORMAT_VERSION, "rng": [ck.rng_state()]}, path)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(ck.load(path)["rng"][0])  # ck.load = weights_only=True
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_inference_checkpoint_round_trip_and_interrupted_write(tmp_path, monkeypatch):
    import json

    from trainer.checkpoint import inference as ic

    state = {"w": torch.randn(3, 4).t(), "b": torch.tensor([1.0, float("nan")])}  # non-contiguous + NaN
    kw = dict(class_names=["a", "b"], backbone="x", drop_rate=0.0, preprocessing={"input_size": 8},
              config={"optim": {"lr": 1e-3}}, metrics={"val/loss": float("inf"), "step": 3})
    folder = ic.save(ic.best_dir(tmp_path / "run"), state, **kw)
    assert sorted(os.listdir(folder)) == ["model.json", "model.safetensors"]
    meta, sd = ic.load_state(folder)
    assert meta["metrics"] == {"val/loss": None, "step": 3} and meta["class_names"] == ["a", "b"]
    assert torch.equal(sd["w"], state["w"]) and torch.equal(sd["b"].isnan(), state["b"].isnan())
    for p in (folder, folder / "model.json", folder / "model.safetensors", tmp_path / "run"):  # accepted spellings
        assert ic.resolve(p) == folder
    first_id = meta["write_id"]
    # a kill between the two files: new weights, old JSON
    import trainer.checkpoint.inference as mod

    real_write = mod.atomic_write

    def die_at_json(path, content):
        if str(path).endswith("model.json"):
            raise KeyboardInterrupt
        return real_write(path, content)

    monkeypatch.setattr(mod, "atomic_write", die_at_json)
    with pytest.raises(KeyboardInterrupt):
        ic.save(folder, {"w": torch.zeros(4, 3), "b": torch.zeros(2)}, **kw)
    monkeypatch.undo()
    assert json.loads((folder / "model.json").read_text())["write_id"] == first_id
    with pytest.raises(ck.CheckpointError, match="different writes"):
        ic.load_state(folder)
    assert ic.repair(folder)  # the next start completes the write
    meta, sd = ic.load_state(folder)
    assert meta["write_id"] != first_id and torch.equal(sd["w"], torch.zeros(4, 3))
    assert sorted(os.listdir(folder)) == ["model.json", "model.safetensors"]
    assert not ic.repair(folder)


def test_older_run_folders_and_plain_weights_files_say_what_to_do(tmp_path):
    from trainer.checkpoint import inference as ic

    run = tmp_path / "run"
    old = {"format_version": 1, "model": {"w": torch.zeros(2)}, "class_names": ["a", "b"], "backbone": "x"}
    ck.atomic_save(old, run / "checkpoints" / "best.pt")  # a run of an older trainer version: best.pt only
    for p in (run, run / "checkpoints"):
        assert ic.resolve(p) == run / "checkpoints" / "best.pt"
    assert ic.read_model_meta(run)["class_names"] == ["a", "b"]
    only_last = tmp_path / "young"
    ck.atomic_save({"format_version": 2}, only_last / "checkpoints" / "last.pt")
    with pytest.raises(ck.CheckpointError, match=r"no checkpoints/best .*: pass .*young/checkpoints/last.pt"):
        ic.resolve(only_last)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ic.resolve(tmp_path / "typo")
    plain = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "class_names": ["a", "b"]}, plain)
    with pytest.raises(ck.CheckpointError) as e:
        ic.load_state(plain)
    msg = str(e.value)
    assert "plain weights (class_names, state_dict)" in msg and "checkpoint.inference.save(" in msg and "\n" not in msg
    newer = tmp_path / "newer.pt"
    torch.save({"format_version": 9}, newer)
    with pytest.raises(ck.CheckpointError, match="newer trainer version .*update the trainer"):
        ck.load(newer)


def _best_folder(tmp_path):
    """A real ``checkpoints/best/`` of a 3-class resnet18 (random weights) and its model."""
    from trainer.models.build import build_model
    from trainer.checkpoint import inference as ic

    torch.manual_seed(0)
    model, pre = build_model("resnet18", 3, "none")
    folder = ic.save(ic.best_dir(tmp_path / "run"), model.state_dict(), class_names=["a", "b", "c"],
                     backbone="resnet18", drop_rate=0.0, preprocessing=pre.to_dict(), config={}, metrics={})
    return folder, model.eval()


def _edit_model_json(folder, edit):
    import json

    meta = json.loads((folder / "model.json").read_text())
    edit(meta)
    (folder / "model.json").write_text(json.dumps(meta))


def test_older_model_json_with_fields_no_longer_read_still_loads(tmp_path):
    """Fields an older version wrote that this loader does not read (top level or in preprocessing) are ignored."""
    from trainer.checkpoint import inference as ic

    folder, model = _best_folder(tmp_path)

    def older(meta):
        meta.update(val_top1=0.9, num_classes=3, weights_format="safetensors")
        meta["preprocessing"]["resize_size"] = 256

    _edit_model_json(folder, older)
    loaded, pre, names = ic.load_for_inference(tmp_path / "run")
    assert names == ["a", "b", "c"] and pre.input_size == 224
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("missing", [("preprocessing",), ("backbone", "class_names"), ("preprocessing.crop_pct",)])
def test_model_json_missing_fields_fails_with_one_line_saying_how_to_convert(tmp_path, missing):
    from trainer.checkpoint import inference as ic

    folder, _ = _best_folder(tmp_path)

    def drop(meta):
        for key in missing:
            parent, _, leaf = key.rpartition(".")
            (meta[parent] if parent else meta).pop(leaf)

    _edit_model_json(folder, drop)
    with pytest.raises(ck.CheckpointError) as e:
        ic.load_for_inference(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / "model.json") in msg
    assert all(k in msg for k in missing) and "convert:" in msg, msg
    ck.atomic_save({"format_version": 2}, folder.parent / "last.pt")  # the way out the message names
    with pytest.raises(ck.CheckpointError, match=r"or pass .*checkpoints/last.pt"):
        ic.load_for_inference(folder)
