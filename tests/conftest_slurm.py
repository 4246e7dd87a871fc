"""Pytest plugin: a real one-node Slurm cluster (slurmctld + slurmd + munged) for ``slurm`` tests.

The ``slurm_cluster`` fixture (session scope) reuses a running cluster (``scontrol ping`` UP), or
installs and starts one with ``tests/helpers/start_slurm.sh`` (Debian's Slurm 22.05, root, no
systemd; about 10-20 s with the install) and stops the daemons it started after the session.
It skips only when that is impossible here (not root, or no ``apt-get`` and no Slurm installed);
with ``REQUIRE_SLURM=1`` (CI) that skip is a failure. A failed start is always a failure, with
the script's output.

Wire-up: ``tests/conftest.py`` imports ``slurm_cluster`` and ``pytest_configure`` from here
(or run pytest with ``-p tests.conftest_slurm``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

START_SCRIPT = Path(__file__).resolve().parent / "helpers" / "start_slurm.sh"
START_TIMEOUT_S = 600  # apt-get update + install on a fresh machine


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a real Slurm cluster (slurm_cluster fixture; ~1 min each)")


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _cluster_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        return "is UP" in _run(["scontrol", "ping"], timeout=10).stdout
    except (subprocess.TimeoutExpired, OSError):
        return False


@dataclass
class SlurmCluster:
    """Handle on the test cluster. ``cpus``: CPUs of its only node (jobs must ask for <= cpus)."""

    cpus: int
    started_here: bool

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id. Raises AssertionError with sbatch's output."""
        proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                              timeout=30, env=env, cwd=cwd)
        assert proc.returncode == 0, f"sbatch {' '.join(args)} failed: {proc.stdout}{proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job_fields(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...); {} if unknown."""
        proc = _run(["scontrol", "show", "job", "-o", job_id])
        fields = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def cancel(self, job_id: str) -> None:
        _run(["scancel", job_id])

    def wait_for(self, predicate, timeout_s: float, what: str, poll_s: float = 0.5):
        """Poll ``predicate()`` until truthy (returned) or raise AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _unavailable(reason: str):
    if os.environ.get("REQUIRE_SLURM") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but no Slurm cluster can be started: {reason}")
    pytest.skip(f"no Slurm cluster: {reason} (set REQUIRE_SLURM=1 to make this an error)")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster (see module docstring); yields :class:`SlurmCluster`."""
    started = False
    if not _cluster_up():
        if os.geteuid() != 0:
            _unavailable("not root (start_slurm.sh installs packages and runs the daemons as root)")
        if not shutil.which("slurmctld") and not shutil.which("apt-get"):
            _unavailable("Slurm is not installed and apt-get is not available")
        try:
            proc = _run(["bash", str(START_SCRIPT)], timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{START_SCRIPT} did not finish within {START_TIMEOUT_S} s: {e.stdout}{e.stderr}")
        if proc.returncode != 0 or not _cluster_up():
            pytest.fail(f"{START_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        started = True
    cpus = int(_run(["sinfo", "-h", "-N", "-o", "%c"]).stdout.split()[0])
    try:
        yield SlurmCluster(cpus=cpus, started_here=started)
    finally:
        if started:
            _run(["bash", str(START_SCRIPT), "stop"], timeout=60)
