"""The automatic stratified split of class folders (issue 23 item 3): small classes keep a val (and test)
image, a class that cannot is named in a warning, val never exceeds its share by more than one image."""

from __future__ import annotations

import logging
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.data_synth import write_class_tree
from trainer.data.listing import list_class_folders, split_sizes, stratified_split


def _share(fraction: float, n: int) -> int:
    """The rounded share of the rule: ``floor(fraction * n + 0.5)`` (round half up)."""
    return math.floor(fraction * n + 0.5)


def test_small_classes_keep_a_val_image():
    # round() gave 0 val (and 0 test) for these: 1-2 images at 0.2, a 5-image class at 0.1 (half to even)
    assert split_sizes(2, 0.2, 0.0) == (1, 1, 0)
    assert split_sizes(5, 0.1, 0.0) == (4, 1, 0)
    assert split_sizes(2, 0.2, 0.2) == (1, 1, 0)  # no room for a test image: train and val first
    assert split_sizes(3, 0.2, 0.2) == (1, 1, 1)
    assert split_sizes(1, 0.2, 0.2) == (1, 0, 0)  # one image: training only (warned, see below)
    assert split_sizes(20, 0.2, 0.2) == (12, 4, 4)  # large classes: the rounded share
    assert split_sizes(7, 1.0, 0.0) == (0, 7, 0)  # evaluation's "everything is val" (launch/evaluate.py)


def test_classes_without_val_or_test_are_named_in_a_warning(caplog):
    files = {"big": [f"b{i}.jpg" for i in range(10)], "single": ["s.jpg"], "pair": ["p0.jpg", "p1.jpg"]}
    with caplog.at_level(logging.WARNING, logger="trainer"):
        out = stratified_split(files, 0.2, 0.1, seed=0)
    assert [len(out[s]["pair"]) for s in ("train", "val", "test")] == [1, 1, 0]
    assert [len(out[s]["single"]) for s in ("train", "val", "test")] == [1, 0, 0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no validation image" in w and "'single'" in w and "'pair'" not in w for w in warnings), warnings
    assert any("no test image" in w and "'single'" in w and "'pair'" in w and "'big'" not in w for w in warnings)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        stratified_split({"big": files["big"], "pair": files["pair"]}, 0.2, 0.0, seed=0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing lost: nothing said


def test_class_folders_of_two_images_get_val(tmp_path):
    root = tmp_path / "imgs"
    write_class_tree(root, {"a": 10, "b": 2, "c": 5})
    listing = list_class_folders(root, val_fraction=0.1)
    val_counts = [sum(1 for it in listing.splits["val"] if it.label == c) for c in range(3)]
    assert val_counts == [1, 1, 1]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
       val_fraction=st.floats(0.05, 0.5), test_fraction=st.one_of(st.just(0.0), st.floats(0.05, 0.45)),
       seed=st.integers(0, 2**31 - 1))
def test_split_properties(sizes, val_fraction, test_fraction, seed):
    """Per class of n images (share(f) = floor(f * n + 0.5)):

    * every image in exactly one split (no image in two, none lost); at least one training image;
    * n >= 2: at least one val image; test_fraction > 0 and n >= 3: at least one test image;
    * val <= max(1, share(val_fraction)) <= val_fraction * n + 1 (the exact bound tested), and the same for test;
    * the same files, fractions and seed give the same split.
    """
    files = {f"c{k}": [f"c{k}/img{i:03d}.jpg" for i in range(n)] for k, n in enumerate(sizes)}
    out = stratified_split(files, val_fraction, test_fraction, seed)
    assert out == stratified_split(files, val_fraction, test_fraction, seed)
    assert ("test" in out) == (test_fraction > 0)
    for cls, names in files.items():
        n = len(names)
        parts = {s: out[s][cls] for s in out}
        assert sorted(f for p in parts.values() for f in p) == sorted(names)  # exactly one split each
        n_val, n_test = len(parts["val"]), len(parts.get("test", []))
        assert len(parts["train"]) >= 1
        if n >= 2:
            assert n_val >= 1, (n, val_fraction, test_fraction)
        if test_fraction > 0 and n >= 3:
            assert n_test >= 1, (n, val_fraction, test_fraction)
        assert n_val <= max(1, _share(val_fraction, n)) <= val_fraction * n + 1
        assert n_test <= max(1 if test_fraction > 0 else 0, _share(test_fraction, n)) <= test_fraction * n + 1
        assert split_sizes(n, val_fraction, test_fraction) == (len(parts["train"]), n_val, n_test)
