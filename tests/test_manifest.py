"""Manifest rows that are wrong (issue 23 items 2, 6, 10c-e): empty labels and paths, byte-order marks, every bad
row named in one line; image decode errors name no Python object."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers.data_synth import write_class_tree
from trainer.config.schema import ConfigError, DataConfig
from trainer.data.decode import ImageDecodeError, decode_image_bytes
from trainer.data.listing import DataError
from trainer.data.manifest import list_manifest, load_label_map
from trainer.data.prepare import prepare_dataset


ONE = SimpleNamespace(num_processes=1, is_main_process=True, process_index=0)


def _csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> str:
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows(rows)
    return str(path)


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "m"
    write_class_tree(root, {"cat": 3, "dog": 3})
    return root


def _rows(split_of=lambda i: "train" if i < 2 else "val") -> list[list[str]]:
    return [["path", "label", "split"]] + [[f"{c}/img{i:03d}.jpg", c, split_of(i)] for c in ("cat", "dog")
                                           for i in range(3)]


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_label_is_refused_naming_file_and_rows(tmp_path, empty):
    root = _tree(tmp_path)
    rows = _rows()
    rows[2][1] = empty  # line 3
    rows[5][1] = empty  # line 6
    manifest = _csv(root / "all.csv", rows)
    with pytest.raises(DataError, match=r"^data\.manifest: all\.csv line 3: empty label \(column 'label'\); "
                                        r"all\.csv line 6: empty label") as info:
        list_manifest(manifest)
    assert "\n" not in str(info.value) and str(root / "all.csv") in str(info.value)
    with pytest.raises(ConfigError, match=r"^data\.manifest: all\.csv line 3: empty label"):  # exit 2 in the CLI
        prepare_dataset(DataConfig(manifest=manifest, shard_dir=str(tmp_path / "s"), shard_workers=1), ONE)


def test_empty_label_in_jsonl_and_label_map(tmp_path):
    root = _tree(tmp_path)
    lines = [{"file": f"{c}/img{i:03d}.jpg", "class": c, "split": "train" if i < 2 else "val"}
             for c in ("cat", "dog") for i in range(3)]
    lines[1]["class"], lines[4]["class"] = None, " "
    (root / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match=r"all\.jsonl line 2: empty label \(column 'class'\); all\.jsonl line 5"):
        list_manifest(str(root / "all.jsonl"))
    (root / "map.json").write_text(json.dumps(["cat", ""]))
    with pytest.raises(DataError, match=r"^data\.label_map: .*map\.json"):
        load_label_map(root / "map.json")


def test_empty_path_is_a_bad_row_not_a_directory(tmp_path):
    root = _tree(tmp_path)
    rows = _rows()
    rows[3][0] = ""  # line 4
    with pytest.raises(DataError, match=r"^data\.manifest: all\.csv line 4: empty path \(column 'path'\)"):
        list_manifest(_csv(root / "all.csv", rows))


def test_every_bad_row_is_named_in_one_line_up_to_a_limit(tmp_path):
    root = _tree(tmp_path)
    rows = _rows()
    rows[1][2] = "holdout"  # line 2: unknown split
    rows[2][1] = ""  # line 3: empty label (line 4, cat's val row, is not named again: cat's training rows are bad)
    rows[4] = rows[4][:1]  # line 5: no label column
    rows += [[f"cat/x{i}.jpg", "", "train"] for i in range(30)]  # lines 8-37: 30 more empty labels
    with pytest.raises(DataError) as info:
        list_manifest(_csv(root / "all.csv", rows))
    text = str(info.value)
    assert "\n" not in text and text.startswith("data.manifest: all.csv line 2: split 'holdout'")
    assert "all.csv line 3: empty label" in text and "all.csv line 5: row has no column" in text
    assert text.count("all.csv line") == 20 and "and 13 more (33 bad rows)" in text
    assert "all.csv line 24:" in text and "all.csv line 25:" not in text  # lines 2, 3, 5, 8-24


def test_unknown_labels_are_all_named(tmp_path):
    root = _tree(tmp_path)
    rows = _rows()
    rows[3][1], rows[6][1] = "bird", "fish"  # val rows, lines 4 and 7
    with pytest.raises(DataError, match=r"^data\.label_column: all\.csv line 4: label 'bird' is not in the class "
                                        r"map .*; all\.csv line 7: label 'fish'"):
        list_manifest(_csv(root / "all.csv", rows))


@pytest.mark.parametrize("split_values", [("train", "val"), ("train", "validation"), ("training", "valid")])
def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path, split_values):
    root = _tree(tmp_path)
    rows = _rows(lambda i: split_values[0] if i < 2 else split_values[1])
    manifest = _csv(root / "all.csv", rows, encoding="utf-8-sig")  # what Excel writes
    assert (root / "all.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    listing = list_manifest(manifest)
    assert listing.classes == ["cat", "dog"] and len(listing.splits["val"]) == 2
    (root / "map.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"dog": 0, "cat": 1}).encode())
    assert list_manifest(manifest, label_map=str(root / "map.json")).classes == ["dog", "cat"]
    jsonl = root / "all.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(dict(zip(rows[0], r))) + "\n" for r in rows[1:]).encode())
    assert list_manifest(str(jsonl)).classes == ["cat", "dog"]


def test_split_files_named_validation(tmp_path):
    root = _tree(tmp_path)
    rows = _rows()
    train = _csv(root / "train.csv", [rows[0][:2]] + [r[:2] for r in rows[1:] if r[2] == "train"])
    val = _csv(root / "validation.csv", [rows[0][:2]] + [r[:2] for r in rows[1:] if r[2] == "val"])
    assert len(list_manifest({"train": train, "validation": val}).splits["val"]) == 2
    with pytest.raises(DataError, match=r"^data\.manifest: both 'val' and 'validation' are given"):
        list_manifest({"train": train, "val": val, "validation": val})


def test_decode_errors_name_no_python_object():
    from trainer.data.shard_writer import check_image

    for fn, exn in ((decode_image_bytes, ImageDecodeError), (check_image, ValueError)):
        with pytest.raises(exn) as info:
            fn(b"plain text, not an image")
        assert "BytesIO" not in str(info.value) and " at 0x" not in str(info.value), str(info.value)
        assert "not a known image format" in str(info.value)
