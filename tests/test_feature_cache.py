"""Feature cache (trainer/train/feature_cache.py): recording, replay, per-rank order, equivalence, a real run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.fake_accelerator import CpuAccelerator
from helpers.realdata import HYMENOPTERA as DATA_ROOT  # HYMENOPTERA_ROOT overrides
from torch import nn

from trainer.finetune.freezing import apply_phase
from trainer.finetune.schedule import Phase
from trainer.models.classifier import ImageClassifier, Preprocessing
from trainer.train.feature_cache import FeatureCache
from trainer.train.loop import evaluate, train_step


def _tiny(frozen: bool = True) -> tuple[ImageClassifier, dict[str, int]]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = ImageClassifier(backbone, 8, 3, preprocessing=Preprocessing(6, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0))
    layer_of = {n: (1 if n.startswith("head") else 0) for n, _ in model.named_parameters()}
    apply_phase(model, layer_of, 2, Phase(0, "head" if frozen else "all"))
    return model, layer_of


def _batches(n_batches: int, bs: int = 4, offset: int = 0, repeat_last: bool = False) -> list[dict]:
    """Deterministic uint8 image batches with unique keys (optionally the last batch repeats keys)."""
    out = []
    for b in range(n_batches):
        idx = list(range(offset + b * bs, offset + (b + 1) * bs))
        if repeat_last and b == n_batches - 1:
            idx = [offset] * bs  # wraps around to the first sample, like the end of a TrainLoader epoch
        out.append({"image": torch.stack([torch.randint(0, 256, (3, 6, 6), generator=torch.Generator()
                                                        .manual_seed(i), dtype=torch.uint8) for i in idx]),
                    "label": torch.tensor([i % 3 for i in idx]), "key": [f"k{i}" for i in idx], "skipped": []})
    return out


def _step(model, batch_iter, opt):
    return train_step(model, batch_iter, optimizer=opt, criterion=nn.CrossEntropyLoss(), accelerator=CpuAccelerator(),
                      grad_accum_steps=1, grad_clip=None)


def _features(model, batch):
    with torch.no_grad():
        return model.forward_features((batch["image"].float() / 255 - 0.5) / 0.5)


def test_records_first_epoch_then_serves_cached_features():
    model, _ = _tiny()
    model.train()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.0)  # lr 0: the backbone output stays comparable
    loader = _batches(3, repeat_last=True)  # 8 distinct samples, last batch repeats k0
    cache = FeatureCache(seed=0, rank=0, micro_batch_size=4)
    stream = cache.train_batches(model, iter(loader), epoch=0, num_batches=3)
    for _ in range(3):
        _step(model, stream, opt)
    assert cache.num_train_samples == 8 and sorted(cache.train_keys) == sorted(f"k{i}" for i in range(8))
    want = {k: f for b in loader[:2] for k, f in zip(b["key"], _features(model, b))}
    for k, f in zip(cache.train_keys, cache.train_features):
        assert torch.allclose(f, want[k], atol=1e-6)
    assert not model.backbone._forward_hooks  # the recording hook is gone

    # later epochs: the loader is not touched, exactly num_batches feature batches
    def boom():
        raise AssertionError("loader read although the cache is complete")
        yield
    b1 = list(cache.train_batches(model, boom(), epoch=1, num_batches=5))
    assert len(b1) == 5 and all(b["features"].shape == (4, 8) for b in b1)
    for b in b1:
        for k, f, y in zip(b["key"], b["features"], b["label"]):
            assert torch.allclose(f, want[k], atol=1e-6) and int(y) == int(k[1:]) % 3
    first8 = [k for b in b1[:2] for k in b["key"]]
    assert sorted(first8) == sorted(want)  # a permutation of the cached samples, then the next one
    again = list(cache.train_batches(model, boom(), epoch=1, num_batches=5))
    assert [b["key"] for b in again] == [b["key"] for b in b1]  # deterministic per (seed, epoch, rank)
    b2 = list(cache.train_batches(model, boom(), epoch=2, num_batches=5))
    assert [b["key"] for b in b2] != [b["key"] for b in b1]  # a new order every epoch
    other_rank = FeatureCache(seed=0, rank=1, micro_batch_size=4)
    other_rank.train_features, other_rank.train_labels, other_rank.train_keys = \
        cache.train_features, cache.train_labels, cache.train_keys
    assert [b["key"] for b in other_rank.train_batches(model, boom(), epoch=1, num_batches=5)] != \
        [b["key"] for b in b1]


def test_cached_step_equals_uncached_step():
    """Training the head on cached features is the same computation as on the images."""
    model_a, _ = _tiny()
    model_b, _ = _tiny()
    model_a.train(), model_b.train()
    opt_a = torch.optim.AdamW(model_a.head.parameters(), lr=0.1)
    opt_b = torch.optim.AdamW(model_b.head.parameters(), lr=0.1)
    batches = _batches(2)
    feats = [{"features": _features(model_b, b), "label": b["label"], "key": b["key"], "skipped": []}
             for b in batches]
    for img_b, feat_b in zip(batches, feats):
        la = _step(model_a, iter([img_b]), opt_a)
        lb = _step(model_b, iter([feat_b]), opt_b)
        assert torch.allclose(la, lb, atol=1e-6)
    for pa, pb in zip(model_a.head.parameters(), model_b.head.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_eval_cache_replays_same_result():
    model, _ = _tiny()
    cache = FeatureCache(seed=0, rank=0, micro_batch_size=4)
    val = _batches(2, offset=100)
    seen = []
    r1 = evaluate(model, cache.eval_batches(model, val), num_classes=3, accelerator=CpuAccelerator(),
                  on_batch=lambda b, lg: seen.append(b["key"]))
    assert cache.val_batches is not None and len(cache.val_batches) == 2
    calls = []
    model.backbone.register_forward_pre_hook(lambda m, a: calls.append(1))
    r2 = evaluate(model, cache.eval_batches(model, val), num_classes=3, accelerator=CpuAccelerator(),
                  on_batch=lambda b, lg: seen.append(b["key"]))
    assert calls == []  # served from the cache: no backbone forward
    assert seen[:2] == seen[2:]  # same keys, same order (the reports' collector still gets key/label/image)
    assert r1.top1 == r2.top1 and abs(r1.loss - r2.loss) < 1e-6
    assert (r1.confusion_dense() == r2.confusion_dense()).all()


def test_unfrozen_backbone_bypasses_and_drops_cache():
    model, layer_of = _tiny()
    cache = FeatureCache(seed=0, rank=0, micro_batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    stream = cache.train_batches(model, iter(_batches(2)), epoch=0, num_batches=2)
    for _ in range(2):
        _step(model, stream, opt)
    assert cache.num_train_samples == 8
    apply_phase(model, layer_of, 2, Phase(1, "all"))
    loader = _batches(2)
    got = list(cache.train_batches(model, iter(loader), epoch=1, num_batches=2))
    assert got == loader and cache.num_train_samples == 0  # images again; features dropped


def test_mid_epoch_resume_does_not_record():
    model, _ = _tiny()
    cache = FeatureCache(seed=0, rank=0, micro_batch_size=4)
    loader = _batches(2)
    got = list(cache.train_batches(model, iter(loader), epoch=0, num_batches=2, start_batch=1))
    assert got == loader and not model.backbone._forward_hooks and cache.num_train_samples == 0


# ---------------------------------------------------------------------------------------------
# a real run on a few ants/bees images


def _tiny_image_root(tmp_path: Path, n_train: int = 8, n_val: int = 4) -> Path:
    root = tmp_path / "images"
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("ants", "bees"):
            src = sorted((DATA_ROOT / split / cls).iterdir())[:n]
            (root / split / cls).mkdir(parents=True)
            for f in src:
                (root / split / cls / f.name).symlink_to(f)
    return root


@pytest.mark.slow
@pytest.mark.skipif(not DATA_ROOT.is_dir(), reason="ants/bees images not available")
def test_run_with_feature_cache_matches_uncached(tmp_path, monkeypatch):
    """Same steps, backbone forwards only in the first epoch and first evaluation, same val result."""
    from trainer.config.loading import load_config
    from trainer.data.shard_writer import write_shards
    from trainer.train.start import run

    root = _tiny_image_root(tmp_path)
    write_shards(root, tmp_path / "shards", max_samples_per_shard=4)
    forwards = []
    orig = ImageClassifier.forward_features
    monkeypatch.setattr(ImageClassifier, "forward_features",
                        lambda self, x: (forwards.append(x.shape[0]), orig(self, x))[1])
    results = {}
    for on in (False, True):
        forwards.clear()
        cfg = load_config(None, {
            "data.shard_dir": str(tmp_path / "shards"), "data.num_workers": 1, "data.augment": "none",
            "train.feature_cache": on, "train.epochs": 3, "train.micro_batch_size": 4,
            "train.global_batch_size": 8, "train.output_dir": str(tmp_path / f"run_{on}"),
            "train.preempt_check_every_steps": 2, "optim.lr": 3e-3,
            "logging.wandb": "disabled", "logging.progress": False})
        res = run(cfg)
        results[on] = (res, sum(forwards))
    (off, n_off), (on, n_on) = results[False], results[True]
    assert off.step == on.step == 6 and off.epoch == on.epoch == 3
    assert n_off == 3 * (16 + 8)  # every epoch: 16 train + 8 val images through the backbone
    assert n_on == 16 + 8  # only the first epoch's
    # 8 val images: the head sees the same features (different sample order), so accuracy agrees
    assert abs(off.last_eval["val/top1"] - on.last_eval["val/top1"]) <= 0.125 + 1e-9
    assert on.best_top1 >= 0.5


def _mapped_from(t: torch.Tensor, path: Path) -> bool:
    """Whether ``t``'s memory lies in a mapping of ``path`` (``/proc/self/maps``)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return True
    return False


def test_cache_bigger_than_the_ram_limit_spills_to_memory_mapped_files(tmp_path):
    """Limit 200 bytes (the cache is ~1.7 KB): train features, val features and images go to files under
    the run folder, RAM held stays within the limit, and the batches equal those of an unlimited cache."""
    model, _ = _tiny()
    model.train()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.0)
    spill = tmp_path / "feature_cache"
    spill.mkdir()
    (spill / "rank0_train_features.bin").write_bytes(b"stale")  # left by a killed run
    caches = {"ram": FeatureCache(seed=0, rank=0, micro_batch_size=4),
              "spill": FeatureCache(seed=0, rank=0, micro_batch_size=4, spill_dir=spill, max_ram_bytes=200,
                                    budget_note="test")}
    assert not (spill / "rank0_train_features.bin").exists()
    for cache in caches.values():
        stream = cache.train_batches(model, iter(_batches(4, repeat_last=True)), epoch=0, num_batches=4)
        for _ in range(4):
            _step(model, stream, opt)
        evaluate(model, cache.eval_batches(model, _batches(3, offset=100)), num_classes=3,
                 accelerator=CpuAccelerator())
    ram, sp = caches["ram"], caches["spill"]
    assert sp.spilled and not ram.spilled and sp.budget.used <= 200
    files = sorted(p.name for p in spill.iterdir())
    assert files == ["rank0_train_features.bin", "rank0_val_features.bin", "rank0_val_images.bin"]
    assert (spill / "rank0_train_features.bin").stat().st_size == 12 * 8 * 4  # 12 distinct samples x F=8 float32
    assert _mapped_from(sp.train_features, spill / "rank0_train_features.bin")  # the file's pages, not a RAM copy
    assert not _mapped_from(ram.train_features, spill / "rank0_train_features.bin")
    assert torch.equal(sp.train_features, ram.train_features) and sp.train_keys == ram.train_keys
    for a, b in zip(sp.train_batches(model, iter([]), epoch=1, num_batches=5),
                    ram.train_batches(model, iter([]), epoch=1, num_batches=5)):
        assert torch.equal(a["features"], b["features"]) and a["key"] == b["key"]
    for a, b in zip(sp.val_batches, ram.val_batches):
        assert torch.equal(a["features"], b["features"]) and torch.equal(a["image"], b["image"])
    sp.clear()  # dropped (phase change, end of the run): the files go too
    assert list(spill.iterdir()) == []


def test_interrupted_recording_leaves_no_spill_file(tmp_path):
    model, _ = _tiny()
    opt = torch.optim.SGD(model.head.parameters(), lr=0.0)
    cache = FeatureCache(seed=0, rank=0, micro_batch_size=4, spill_dir=tmp_path, max_ram_bytes=0)
    stream = cache.train_batches(model, iter(_batches(4)), epoch=0, num_batches=4)
    _step(model, stream, opt)  # a preemption after the first of 4 steps
    stream.close()
    assert cache.train_features is None and list(tmp_path.iterdir()) == [] and cache.budget.used == 0


def test_ram_fraction_is_checked_and_split_over_the_ranks_of_a_node(monkeypatch):
    from trainer.config.loading import load_config
    from trainer.config.schema import ConfigError
    from trainer.train.feature_cache import feature_cache_budget

    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="train.feature_cache_max_ram_fraction"):
            load_config(None, {"train.feature_cache_max_ram_fraction": bad})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    quarter = feature_cache_budget(0.5, world_size=8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert quarter["max_ram_bytes"] == pytest.approx(feature_cache_budget(0.5, world_size=8)["max_ram_bytes"] / 4, abs=1)
    assert "4 rank(s) per node" in quarter["budget_note"]
