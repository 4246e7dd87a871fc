"""Row stores that live in host memory up to a budget and spill to a memory-mapped file beyond it.

Used by the feature cache (``trainer.train.feature_cache``): rows (features ``(F,) float32``, images
``(3, S, S) uint8``) are appended batch by batch while the first epoch runs; the total is not known in
advance (the number of samples a rank reads, the feature width). A :class:`RamBudget` shared by all
stores of one cache says how many bytes may stay in RAM; the store whose append would exceed it
writes everything it holds to ``<folder>/<name>.bin`` and appends there from then on. At
:meth:`RowStore.finish` the rows are one ``(N, *row)`` tensor: in RAM, or backed by the file through
``numpy.memmap`` (copy-on-write mode: pages are read on demand and the page cache, not the process,
holds them), so a cache bigger than the budget never grows the process beyond it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["RamBudget", "RowStore", "host_ram_bytes"]


def host_ram_bytes() -> int:
    """Memory this process may use: physical RAM, or the cgroup limit if lower (containers, Slurm jobs).

    Reads ``sysconf`` and, where present, ``/sys/fs/cgroup/memory.max`` (v2) or
    ``/sys/fs/cgroup/memory/memory.limit_in_bytes`` (v1).

    Returns:
        bytes.
    """
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def fmt_bytes(n: float) -> str:
    """``1.5 GB`` style (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


class RamBudget:
    """Bytes the stores of one cache may keep in RAM (``None``: no limit).

    Args:
        limit: bytes, or None.
        what: how the limit came about, for the log line (e.g. ``"train.feature_cache_max_ram_fraction
            0.25 of 64.0 GB RAM / 2 ranks per node"``).
    """

    def __init__(self, limit: int | None, what: str = ""):
        self.limit, self.what, self.used = limit, what, 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; False (nothing reserved) if that would exceed the limit."""
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


class RowStore:
    """Append-only rows of one dtype and shape; in RAM while the budget allows, else in ``folder/name.bin``.

    Args:
        folder: where a spill file goes (created on the first spill); None: never spill (the budget
            is then ignored).
        name: file stem (``rank0_train_features``).
        budget: shared :class:`RamBudget`.
    """

    def __init__(self, folder: Path | None, name: str, budget: RamBudget):
        self.folder, self.name, self.budget = folder, name, budget
        self.chunks: list[torch.Tensor] = []
        self.ram_bytes = 0
        self.rows = 0
        self.row_shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self._file = None

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / f"{self.name}.bin"

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def append(self, rows: torch.Tensor) -> None:
        """Add ``(B, *row)`` rows (copied; CPU)."""
        rows = rows.detach().to("cpu").contiguous()
        if self.row_shape is None:
            self.row_shape, self.dtype = tuple(rows.shape[1:]), rows.dtype
        elif tuple(rows.shape[1:]) != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(f"RowStore {self.name}: rows {tuple(rows.shape[1:])} {rows.dtype}, "
                             f"expected {self.row_shape} {self.dtype}")
        nbytes = rows.numel() * rows.element_size()
        self.rows += rows.shape[0]
        if self._file is None and (self.folder is None or self.budget.take(nbytes)):
            self.chunks.append(rows.clone())
            self.ram_bytes += nbytes
            return
        if self._file is None:
            self._spill()
        self._file.write(rows.numpy().tobytes())

    def _spill(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log.warning("feature cache: %s would exceed its RAM budget of %s (%s); writing it to %s",
                    self.name, fmt_bytes(self.budget.limit or 0), self.budget.what, self.path)
        self._file = open(self.path, "wb")
        for c in self.chunks:
            self._file.write(c.numpy().tobytes())
        self.chunks = []
        self.budget.give(self.ram_bytes)
        self.ram_bytes = 0

    def finish(self) -> torch.Tensor:
        """All rows as one ``(N, *row)`` tensor (RAM, or memory-mapped from the spill file).

        Raises:
            ValueError: nothing was appended.
        """
        if self.row_shape is None:
            raise ValueError(f"RowStore {self.name}: no rows")
        if self._file is None:
            out = torch.cat(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
            self.chunks = [out]
            return out
        self._file.close()
        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
        mm = np.memmap(self.path, dtype=np_dtype, mode="c", shape=(self.rows, *self.row_shape))
        return torch.from_numpy(mm)

    def discard(self) -> None:
        """Drop the rows, give the RAM back and delete the spill file."""
        self.budget.give(self.ram_bytes)
        self.chunks, self.ram_bytes, self.rows = [], 0, 0
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None and self.path.exists():
            self.path.unlink()
