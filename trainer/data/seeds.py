"""Stable seeds derived from strings."""

from __future__ import annotations

import hashlib


def seed_int(text: str) -> int:
    """Stable 63-bit seed from a string (independent of ``PYTHONHASHSEED`` and the platform).

    The first 8 bytes of SHA-256(``text``), little-endian, shifted right by one so the value fits a
    signed 64-bit integer (``torch.Generator.manual_seed`` accepts it).

    Returns:
        An int in [0, 2**63).
    """
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
