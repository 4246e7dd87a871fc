"""Checkpoint mechanics: atomic writes, name-matched optimizer state, truncated files."""

import os

import pytest
import torch

from trainer.train import checkpoint as ck


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
    assert ck.latest_checkpoint(tmp_path) == target


def test_truncated_checkpoint_names_the_file(tmp_path):
    target = tmp_path / "last.pt"
    ck.atomic_save({"format_version": ck.FORMAT_VERSION, "w": torch.randn(1000)}, target)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=str(target)):
        ck.load(target)
