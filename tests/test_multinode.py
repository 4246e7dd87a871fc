"""Failure case 16 and issue 5 item 5: multi-node launches simulated on one machine over 127.0.0.1.

Two ``accelerate launch --num_machines 2`` launchers (one per "node", different ``--machine_rank``)
rendezvous on a free port. Checked: each node gets its own machine rank (GROUP_RANK) and the ranks
are numbered node by node; the REAL trainer runs to completion over two launchers; a wrong machine
rank or port fails within seconds with a message (``--rdzv_conf timeout=5``, as slurm/finetune.sh
passes); the trainer's own checks of the launcher variables (``trainer.distributed.accelerator``).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers.launch_util import REPO, accelerate_cmd, child_env
from helpers.realdata import (
    HYMENOPTERA,
    free_port,
    run_metrics,
    subset_folder,
    tiny_overrides,
)

from trainer.distributed.accelerator import DistributedSetupError, check_launch_env

RENDEZVOUS = "tests/helpers/rendezvous_check.py"


def _two_nodes(script: str, args: list[str], *, nproc_per_node: int, ranks=(0, 1), ports=None, timeout=240):
    """Start one launcher per machine rank in ``ranks``; return [(returncode, output, seconds)]."""
    port = free_port()
    ports = ports or (port, port)
    procs = []
    t0 = time.monotonic()
    for machine_rank, p in zip(ranks, ports):
        cmd = accelerate_cmd(script, *args, nproc=2 * nproc_per_node, port=p, num_machines=2,
                             machine_rank=machine_rank, rdzv_timeout_s=5)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, time.monotonic() - t0))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def _infos(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{\"rank\"")]


@pytest.mark.slow
def test_two_nodes_times_two_processes_get_their_machine_rank():
    results = _two_nodes(RENDEZVOUS, [], nproc_per_node=2)
    for rc, out, _ in results:
        assert rc == 0, out[-3000:]
    infos = [i for _, out, _ in results for i in _infos(out)]
    assert sorted((i["group_rank"], i["local_rank"], i["rank"]) for i in infos) == [
        (0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)]
    assert all(i["world_size"] == 4 and i["sum"] == 6 for i in infos)
    assert {i["group_rank"] for i in _infos(results[0][1])} == {0}  # first launcher = machine rank 0
    assert {i["group_rank"] for i in _infos(results[1][1])} == {1}


@pytest.mark.slow
@pytest.mark.parametrize("wrong", ["machine_rank", "port"])
def test_wrong_setting_fails_within_seconds_with_a_message(wrong):
    port = free_port()
    if wrong == "machine_rank":  # both launchers claim machine rank 0
        results = _two_nodes(RENDEZVOUS, [], nproc_per_node=1, ranks=(0, 0), ports=(port, port), timeout=120)
    else:  # node 1 dials a port where nobody listens
        results = _two_nodes(RENDEZVOUS, [], nproc_per_node=1, ports=(port, free_port()), timeout=120)
    text = "\n".join(out for _, out, _ in results)
    assert all(rc != 0 for rc, _, _ in results), text[-4000:]
    assert max(t for _, _, t in results) < 90, text[-4000:]  # measured ~15-25 s on 2 busy cores; not 600 s
    assert ("clients joined" in text or "another process is utilizing" in text
            or "Timed out" in text or "timed out" in text), text[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs {HYMENOPTERA}")
def test_real_trainer_over_two_launchers(tmp_path):
    subset_folder(tmp_path / "img", {"train": {"ants": 4, "bees": 4}, "val": {"ants": 2, "bees": 2}})
    out = tmp_path / "run"
    args = ["--config", "configs/ants_bees_lite0.yaml",
            *tiny_overrides(tmp_path / "img", tmp_path / "shards", out,
                            **{"train.epochs": 1, "train.max_steps": 2, "train.global_batch_size": 4,
                               "data.samples_per_shard": 2, "optim.warmup_steps": 0,
                               "train.micro_batch_size": 2})]
    results = _two_nodes("trainer/main.py", args, nproc_per_node=1, timeout=300)
    for rc, text, _ in results:
        assert rc == 0, text[-4000:]
    assert "world_size=2" in results[0][1]
    ev = [r for r in run_metrics(out) if "val/top1" in r][-1]
    assert ev["val/num_samples"] == 4 and ev["step"] == 2
    assert ev["ddp/replica_max_abs_diff"] == 0.0


BASE = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("change, needle", [
    ({"MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"RANK": "4"}, "RANK=4 is outside 0..3"),
    ({"GROUP_RANK": "2"}, "GROUP_RANK=2 (machine rank) is outside 0..1"),
    ({"RANK": "1"}, "RANK=1 but GROUP_RANK=1"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside 0..1"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
])
def test_launch_env_checks_name_the_variable(change, needle):
    check_launch_env(BASE)
    check_launch_env({})  # single process: nothing to check
    with pytest.raises(DistributedSetupError) as e:
        check_launch_env({**BASE, **change})
    assert needle in str(e.value)
    assert "--" in str(e.value) or "launcher" in str(e.value)  # names the flag or the launcher


@pytest.mark.slow  # a launched worker process
def test_unreachable_master_is_named(tmp_path):
    """A worker whose rendezvous address does not answer fails with MASTER_ADDR:MASTER_PORT named."""
    code = ("from trainer.distributed.accelerator import make_accelerator\n"
            "make_accelerator('no', timeout_s=5)\n")
    port = free_port()
    env = child_env(WORLD_SIZE="2", RANK="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port), TORCH_DIST_INIT_BARRIER="0")
    t0 = time.monotonic()
    p = subprocess.run([str(Path(REPO, ".venv/bin/python")) if Path(REPO, ".venv/bin/python").exists()
                        else "python", "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert f"127.0.0.1:{port}" in p.stderr and "DistributedSetupError" in p.stderr, p.stderr[-3000:]
    assert time.monotonic() - t0 < 90
