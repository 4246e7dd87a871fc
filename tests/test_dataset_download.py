"""The main job's fallback download: archive fetched once, tree checksum verified before use."""

import zipfile

import pytest

from trainer.config.schema import ConfigError, DataConfig
from trainer.data.prepare import download_image_folder, tree_sha256


def _zip_tree(tmp_path):
    src = tmp_path / "src" / "imgs"
    for split, cls in (("train", "a"), ("train", "b"), ("val", "a")):
        (src / split / cls).mkdir(parents=True)
        (src / split / cls / "x.jpg").write_bytes(f"{split}/{cls}".encode())
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(src.rglob("*")):
            z.write(p, p.relative_to(src.parent))
    return src, archive


def test_download_checks_the_unpacked_tree(tmp_path):
    src, archive = _zip_tree(tmp_path)
    cfg = DataConfig(root=str(tmp_path / "absent" / "imgs"), download_url=archive.as_uri(),
                     tree_sha256=tree_sha256(src), download_dir=str(tmp_path / "dl"))
    root = download_image_folder(cfg)
    assert root == tmp_path / "dl" / "imgs"
    assert (root / "train" / "b" / "x.jpg").read_bytes() == b"train/b"
    assert download_image_folder(cfg) == root  # second call: already there, nothing fetched


def test_checksum_mismatch_is_an_error_naming_the_field(tmp_path):
    _, archive = _zip_tree(tmp_path)
    cfg = DataConfig(root=str(tmp_path / "absent" / "imgs"), download_url=archive.as_uri(),
                     tree_sha256="0" * 64, download_dir=str(tmp_path / "dl"))
    with pytest.raises(ConfigError, match="data.tree_sha256"):
        download_image_folder(cfg)
    assert not (tmp_path / "dl" / "imgs").exists()  # nothing half-verified is left as the data root
    cfg.tree_sha256, cfg.download_sha256 = None, "f" * 64
    with pytest.raises(ConfigError, match="data.download_sha256"):
        download_image_folder(cfg)


def test_no_url_names_the_missing_root(tmp_path):
    with pytest.raises(ConfigError, match="data.root: folder not found"):
        download_image_folder(DataConfig(root=str(tmp_path / "nope")))
