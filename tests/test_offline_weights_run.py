"""Failure case 15 through the real run path: ``model.weights=default`` on an offline node with an empty
cache. ``trainer/train/trainer.py`` calls ``trainer.models.weights.ensure_weights`` (local rank 0 checks/fetches, the
others wait) before building the model, so both ranks fail fast, and the main process prints one line naming the expected
file and the prefetch command, instead of a socket time-out or a hang. (Cache layout, truncated
files and the one-downloader rule are unit-tested in tests/test_weights.py.)
"""

from __future__ import annotations

import subprocess
import time

import pytest
from helpers.launch_util import REPO, accelerate_cmd, child_env
from helpers.realdata import HYMENOPTERA, free_port, subset_folder, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")]


@pytest.mark.parametrize("backbone, expected", [
    ("timm:resnet18", "hub/models--timm--resnet18"),
    ("resnet18", "hub/checkpoints/resnet18-"),
])
def test_empty_cache_offline_two_ranks_fail_fast_naming_the_file(tmp_path, backbone, expected):
    subset_folder(tmp_path / "img", {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}})
    cache = tmp_path / "cache"
    env = child_env(TRAINER_OFFLINE="1", TORCH_HOME=str(cache / "torch"), HF_HOME=str(cache / "hf"))
    env.pop("HF_HUB_CACHE", None)
    args = ["--config", "configs/ants_bees_lite0.yaml",
            *tiny_overrides(tmp_path / "img", tmp_path / "shards", tmp_path / "run",
                            **{"model.backbone": backbone, "model.weights": "default", "train.max_steps": 1,
                               "train.global_batch_size": 2, "train.micro_batch_size": 1})]
    t0 = time.monotonic()
    p = subprocess.run(accelerate_cmd("trainer/main.py", *args, nproc=2, port=free_port()), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    text = p.stdout + p.stderr
    assert p.returncode != 0  # the ranks exit 2; the launcher reports that as its own failure
    lines = [ln for ln in text.splitlines() if ln.startswith("error: pretrained weights")]
    assert len(lines) == 1, text[-4000:]  # one line, printed once by the main process; no hang
    root = "hf" if backbone.startswith("timm:") else "torch"
    for ln in lines:
        assert str(cache / root) in ln and expected in ln and "prefetch_weights.py" in ln, ln
    assert elapsed < 120, elapsed  # process start + data only; no network time-out
    assert not list(cache.rglob("*.safetensors")) and not list(cache.rglob("*.pth"))
