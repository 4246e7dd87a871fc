"""Shared pytest fixtures. The Slurm cluster fixture lives in tests/conftest_slurm.py."""

try:  # tests/ on sys.path (rootdir conftest, no tests/__init__.py) or the repo root
    from conftest_slurm import pytest_configure, slurm_cluster  # noqa: F401
except ImportError:
    from tests.conftest_slurm import pytest_configure, slurm_cluster  # noqa: F401
