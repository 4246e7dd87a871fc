"""The model card ``README.md`` of an inference checkpoint folder, written from its ``model.json`` fields
(the text is :func:`trainer.reporting.model_card.model_card`; this module adds the split sizes and the weights'
licence and writes the file)."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.reporting.model_card import model_card
from trainer.files.atomic import atomic_write

CARD_FILE = "README.md"


def write_card(folder: Path, meta: dict, config_text: str | None, test_metrics: dict | None = None) -> bool:
    """Write ``folder/README.md`` for the checkpoint described by ``meta`` (``model.json``'s dict).

    Args:
        config_text: timm's ``config.json`` text when the weights are in timm's names (the card then says the
            folder loads with ``timm.create_model("local-dir:...")`` and names the pretrained weights' licence).
        test_metrics: the ``test/...`` record of this checkpoint, when the run evaluated it.

    Returns:
        False (nothing written) when ``meta`` holds no run config (``data`` and ``model`` sections).
    """
    cfg = meta.get("config")
    if not (isinstance(cfg, dict) and isinstance(cfg.get("data"), dict) and isinstance(cfg.get("model"), dict)):
        return False  # not a run's config: nothing to describe the data and recipe with
    lic = (json.loads(config_text).get("pretrained_cfg") or {}).get("license") if config_text else None
    card = model_card(meta, timm_loadable=bool(config_text), timm_reason=meta.get("timm_unavailable") or "",
                      split_sizes=split_sizes(cfg["data"]), test_metrics=test_metrics, weights_license=lic)
    atomic_write(folder / CARD_FILE, card)
    return True


def split_sizes(data: dict) -> dict[str, int] | None:
    """Images per split from the run's ``dataset.json`` (``data.meta``, else the one in ``data.shard_dir``);
    None when it cannot be read (e.g. the checkpoint was copied to another machine)."""
    from trainer.data import meta as dataset_meta

    where = data.get("meta") or data.get("shard_dir")
    if not where:
        return None
    try:
        found = dataset_meta.read_meta(where)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {name: split.num_samples for name, split in found.splits.items()}
