"""Shared pytest fixtures. The Slurm cluster fixture lives in tests/conftest_slurm.py."""

try:  # tests/ on sys.path (rootdir conftest, no tests/__init__.py) or the repo root
    from conftest_slurm import pytest_configure, slurm_cluster  # noqa: F401
except ImportError:
    from tests.conftest_slurm import pytest_configure, slurm_cluster  # noqa: F401

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test builds its Accelerator from scratch: accelerate keeps one process-wide state and refuses
    a second Accelerator with another mixed precision (``train.mixed_precision: auto`` resolves per
    config and hardware, so in-process runs of different configs differ)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
