"""trainer/models/weights.py: offline weights cache (failure case 15)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torchvision.models import ResNet18_Weights

from trainer.models import weights as W

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Empty torch hub + HF caches under tmp_path; no network; downloads forbidden (they raise)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "TRAINER_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def no_network(*args, **kwargs):
        calls.append(args)
        raise OSError("network disabled in test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    return calls


def _tiny_state_dict_file(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": torch.arange(6.0).reshape(2, 3)}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_paths(cache, tmp_path):
    assert W.weights_source("resnet18").cache_path() == tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth"
    assert W.weights_source("torchvision:resnet18").cache_path() == W.weights_source("resnet18").cache_path()
    hf = W.weights_source("timm:resnet18.a1_in1k").cache_path()
    assert hf.parts[-5:-2] == ("hub", "models--timm--resnet18.a1_in1k", "snapshots")
    assert hf.name == "model.safetensors" and str(hf).startswith(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="keras:resnet"):
        W.weights_source("keras:resnet")


@pytest.mark.parametrize("offline_env", [True, False], ids=["TRAINER_OFFLINE=1", "probe-fails"])
def test_empty_cache_no_network_fails_fast(cache, tmp_path, monkeypatch, offline_env):
    if offline_env:
        monkeypatch.setenv("TRAINER_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(W.WeightsUnavailableError) as err:
        W.ensure_weights("resnet18", local_rank=0, barrier=lambda: None)
    assert time.monotonic() - t0 < 2.0
    msg = str(err.value)
    assert str(tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth") in msg
    assert "python launch/prefetch_weights.py resnet18" in msg
    assert len(cache) == (0 if offline_env else 1)  # offline: not even a probe; else 1 probe, no download


def test_probe_of_real_closed_port_is_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert W.network_reachable("127.0.0.1", port) is False
    assert time.monotonic() - t0 < W.PROBE_TIMEOUT_S + 0.5


def test_cached_torchvision_file_used_without_network(cache, tmp_path, monkeypatch):
    weights = ResNet18_Weights.IMAGENET1K_V1
    staged = tmp_path / "staged.pth"
    digest = _tiny_state_dict_file(staged)
    # a weights url whose file name carries the hash prefix of our small file, as torchvision's do
    monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/tiny-{digest[:8]}.pth")
    expected = tmp_path / f"torch/hub/checkpoints/tiny-{digest[:8]}.pth"
    expected.parent.mkdir(parents=True)
    staged.rename(expected)

    assert W.ensure_weights("resnet18", local_rank=0, barrier=lambda: None, offline=False) == expected
    assert cache == []  # no probe, no download
    assert torch.equal(weights.get_state_dict()["fc.weight"], torch.arange(6.0).reshape(2, 3))  # torchvision finds it


def _hf_cache_file(tmp_path: Path, repo: str, data: bytes | None) -> Path:
    """Lay out a HF hub cache entry by hand (refs/main -> snapshot file), as hf_hub_download does."""
    folder = tmp_path / "hf/hub" / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs/main").write_text(commit)
    path = folder / "snapshots" / commit / "model.safetensors"
    path.parent.mkdir(parents=True)
    if data is None:
        import safetensors.torch

        safetensors.torch.save_file({"head.fc.weight": torch.ones(2, 3)}, str(path))
    else:
        path.write_bytes(data)
    return path


def test_cached_timm_hf_file_used_without_network(cache, tmp_path):
    path = _hf_cache_file(tmp_path, "timm/resnet18.a1_in1k", None)
    got = W.ensure_weights("timm:resnet18.a1_in1k", local_rank=0, barrier=lambda: None, offline=False)
    assert got == path and cache == []


def test_truncated_torchvision_file_names_path(cache, tmp_path):
    path = tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth"
    _tiny_state_dict_file(path)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(W.CorruptWeightsError, match=str(path)):
        W.ensure_weights("resnet18", local_rank=0, barrier=lambda: None)
    assert cache == []


def test_truncated_hf_file_names_path(cache, tmp_path):
    path = _hf_cache_file(tmp_path, "timm/resnet18.a1_in1k", None)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(W.CorruptWeightsError, match="cannot be loaded") as err:
        W.ensure_weights("timm:resnet18.a1_in1k", local_rank=0, barrier=lambda: None)
    assert str(path) in str(err.value)


def _run_local_ranks(n: int, fn):
    """Run fn(local_rank, barrier) in n threads sharing one barrier; return results/exceptions."""
    barrier = threading.Barrier(n, timeout=10)
    results: dict[int, object] = {}

    def target(rank):
        try:
            results[rank] = fn(rank, barrier.wait)
        except Exception as e:  # collected for the assertions
            results[rank] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)
    return results


def test_only_local_rank_zero_downloads(cache, tmp_path, monkeypatch):
    staged = tmp_path / "staged.pth"
    digest = _tiny_state_dict_file(staged)
    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.value, "url",
                        f"https://download.pytorch.org/models/tiny-{digest[:8]}.pth")
    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        downloads.append((threading.current_thread().name, url, hash_prefix))
        time.sleep(0.2)  # the other rank must be waiting at the barrier meanwhile
        Path(dst).write_bytes(staged.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(W, "network_reachable", lambda host, port, timeout_s=3.0: True)
    results = _run_local_ranks(3, lambda r, b: W.ensure_weights("resnet18", local_rank=r, barrier=b))
    expected = tmp_path / f"torch/hub/checkpoints/tiny-{digest[:8]}.pth"
    assert results == {0: expected, 1: expected, 2: expected}
    assert len(downloads) == 1 and downloads[0][2] == digest[:8]


def test_rank_zero_failure_does_not_hang_others(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_OFFLINE", "1")
    t0 = time.monotonic()
    results = _run_local_ranks(2, lambda r, b: W.ensure_weights("resnet18", local_rank=r, barrier=b))
    assert time.monotonic() - t0 < 5
    assert all(isinstance(e, W.WeightsUnavailableError) for e in results.values())
    assert "resnet18-f37072fd.pth" in str(results[1]) and "local rank 0" in str(results[1])


WORKER = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from trainer.models.weights import ensure_weights
    dist.init_process_group("gloo")
    try:
        ensure_weights("resnet18", local_rank=int(os.environ["LOCAL_RANK"]), barrier=dist.barrier)
    except Exception as e:
        # one write() per line, so the two ranks' lines never interleave (PYTHONUNBUFFERED in CI)
        os.write(1, f"rank{dist.get_rank()}: {type(e).__name__}: {e}\\n".encode())
        sys.exit(3)
""")


@pytest.mark.slow  # two torchrun processes
def test_two_ranks_empty_cache_offline_fail_fast(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_HOME=str(tmp_path / "torch"),
               HF_HOME=str(tmp_path / "hf"), TRAINER_OFFLINE="1", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    expected = str(tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth")
    for rank in (0, 1):
        line = next(l for l in out.splitlines() if l.startswith(f"rank{rank}: WeightsUnavailableError"))
        assert expected in line
    assert elapsed < 60  # seconds of start-up, never a socket or collective time-out
