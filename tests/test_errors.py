"""A failure the user can fix ends as one line naming the field or file, exit status 2, no traceback on
screen (trainer/cli/errors.py); the traceback goes to <output_dir>/logs/error-rank<r>.log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.realdata import HYMENOPTERA, free_port, subset_folder

import trainer.main as entry
from trainer.cli.errors import error_line, is_user_error, report
from trainer.config.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/ants_bees_lite0.yaml")

needs_data = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of 8+8 train / 4+4 val ants/bees images, 8 per shard (2 train shards)."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"needs {HYMENOPTERA}")
    from trainer.data.shard_writer import write_shards

    root = tmp_path_factory.mktemp("err")
    images = subset_folder(root / "images", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 4, "bees": 4}})
    write_shards(images, root / "shards", max_samples_per_shard=8)
    return root / "shards"


def _overrides(shards: Path, out: Path, **extra) -> dict:
    ov = {"data.root": None, "data.shard_dir": str(shards), "data.num_workers": 1, "data.augment": "none",
          "train.output_dir": str(out), "train.global_batch_size": 8, "train.micro_batch_size": 4,
          "train.max_steps": 1, "logging.wandb": "disabled", "logging.progress": False}
    ov.update(extra)
    return ov


def _fails_with_one_line(capfd, **overrides) -> str:
    """Run main() in-process; assert exit 2, exactly one error line, no traceback; return the line."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        entry.main(config=CONFIG, **overrides)
    err = capfd.readouterr().err
    assert e.value.code == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(("config error:", "error:"))]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_unwritable_output_dir_is_found_before_any_set_up(tmp_path, capfd):
    (tmp_path / "afile").write_text("x")
    line = _fails_with_one_line(capfd, **{"train.output_dir": str(tmp_path / "afile" / "run"),
                                          "data.root": str(tmp_path / "never-read")})
    assert line.startswith("config error: train.output_dir: cannot write into") and "afile" in line


@needs_data
def test_shard_glob_that_matches_nothing(shards, tmp_path, capfd):
    spec = str(tmp_path / "none-*.tar")
    line = _fails_with_one_line(capfd, **_overrides(shards, tmp_path / "run", **{"data.train_shards": spec}))
    assert spec in line and "no shard matches" in line
    log = tmp_path / "run/logs/error-rank0.log"
    assert "Traceback" in log.read_text() and "resolve_shards" in log.read_text()


@needs_data
def test_fewer_shards_than_readers(shards, tmp_path, capfd):
    line = _fails_with_one_line(capfd, **_overrides(shards, tmp_path / "run", **{"data.num_workers": 4}))
    assert line.startswith("config error: data.num_workers: 2 shard(s) for 1 rank(s) x 4 worker(s)")


@needs_data
def test_truncated_last_checkpoint(shards, tmp_path, capfd):
    ckpt = tmp_path / "run/checkpoints/last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 40)  # the start of a zip, cut short
    line = _fails_with_one_line(capfd, **_overrides(shards, tmp_path / "run"))
    assert str(ckpt) in line and "to start the run over" in line  # what to do
    assert not (tmp_path / "run/logs").exists()  # a refused start writes nothing into the run folder


def test_only_rank_0_prints_and_debug_shows_the_traceback(tmp_path, capfd, monkeypatch):
    from trainer.cli import errors

    monkeypatch.setattr(errors, "_log_dir", tmp_path / "logs")
    try:
        raise ConfigError("optim.lr: 'x' is not allowed")
    except ConfigError as e:
        exc = e
    monkeypatch.setenv("RANK", "1")
    assert report(exc) == 2 and capfd.readouterr().err == ""
    assert "optim.lr" in (tmp_path / "logs/error-rank1.log").read_text()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TRAINER_DEBUG", "1")
    report(exc)
    err = capfd.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "config error: optim.lr: 'x' is not allowed"
    assert is_user_error(PermissionError(13, "Permission denied", "/x")) and not is_user_error(KeyError("bug"))
    assert error_line(FileNotFoundError(2, "No such file", "/a/b")) == "error: [Errno 2] No such file: '/a/b'"
    assert error_line(ConfigError("a\nb")) == "config error: a b"  # always one line


@pytest.mark.slow
@needs_data
def test_two_processes_print_the_error_once(shards, tmp_path):
    ckpt = tmp_path / "run/checkpoints/last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 40)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    ov = _overrides(shards, tmp_path / "run", **{"train.global_batch_size": 8, "data.resampled": True})
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "trainer/main.py", "--config", CONFIG, *[f"--{k}={v}" for k, v in ov.items()]]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if str(ckpt) in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-4000:]
    # no traceback from the trainer's processes (the launcher prints its own summary of the failed child:
    # torch.distributed.elastic's ChildFailedError, with "exitcode : 2" for rank 0)
    assert f'{REPO / "trainer"}' not in p.stderr and "exitcode  : 2" in p.stderr, p.stderr[-4000:]
    assert not (tmp_path / "run/logs").exists()  # refused before any work: nothing written

