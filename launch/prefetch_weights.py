"""Fill the pretrained-weights cache on a machine with internet (e.g. a login node).

Compute nodes without internet then find the files in the same cache (shared ``$TORCH_HOME`` /
``$HF_HOME``), see ``trainer/models/weights.py``. Each file is verified (hash or load) after download.

    python launch/prefetch_weights.py resnet50 timm:convnext_tiny
    TORCH_HOME=/shared/cache/torch HF_HOME=/shared/cache/hf python launch/prefetch_weights.py vit_b_16

Prints one ``<backbone>\t<path>`` line per backbone; exits non-zero naming the backbone on failure.
"""

from __future__ import annotations

import sys

from trainer.cli.errors import run_cli
from trainer.models.weights import fetch_weights


def prefetch(*backbones: str) -> None:
    """Download (if not cached) and verify the default pretrained weights of each backbone.

    Args:
        backbones: ``resnet50`` / ``torchvision:resnet50`` or ``timm:<model>[.<tag>]``.

    Raises:
        SystemExit(1): after trying all, if any failed (each failure printed to stderr).
    """
    if not backbones:
        raise SystemExit("usage: python launch/prefetch_weights.py BACKBONE [BACKBONE ...]")
    failed = 0
    for backbone in backbones:
        try:
            path = fetch_weights(str(backbone), offline=False)
        except Exception as e:  # report every backbone, then fail
            print(f"{backbone}\tFAILED: {e}", file=sys.stderr)
            failed += 1
        else:
            print(f"{backbone}\t{path}")
    if failed:
        raise SystemExit(1)


def cli() -> None:
    """Console script ``finetune-prefetch-weights`` (same as ``python launch/prefetch_weights.py``)."""
    run_cli(prefetch, prog="finetune-prefetch-weights")


if __name__ == "__main__":
    run_cli(prefetch)
