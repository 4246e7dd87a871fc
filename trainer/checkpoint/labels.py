"""What an inference checkpoint's ``model.json`` says about its outputs: the task and, for a multi-label model, the
per-class decision thresholds predict, evaluate and export apply (one rule for all three)."""

from __future__ import annotations

from collections.abc import Sequence

from trainer.checkpoint.state import CheckpointError
from trainer.reporting.multilabel import DEFAULT_THRESHOLD


def checkpoint_task(meta: dict) -> tuple[bool, list[float] | None]:
    """``(multilabel, thresholds)`` of an inference checkpoint's ``model.json``
    (:func:`trainer.checkpoint.inference.read_model_meta`): ``config.data.task`` and the saved per-class
    ``thresholds`` (None if absent)."""
    data = (meta.get("config") or {}).get("data") or {}
    thresholds = meta.get("thresholds")
    return data.get("task", "multiclass") == "multilabel", None if thresholds is None else list(thresholds)


def decision_thresholds(meta: dict, num_classes: int,
                        override: float | Sequence[float] | None = None) -> list[float] | None:
    """The C thresholds a multi-label checkpoint's classes are predicted at (a class is present when its
    probability is >= its threshold), or None for a single-label checkpoint.

    Args:
        meta: the checkpoint's ``model.json``. num_classes: C.
        override: one value for every class or C values (``--threshold``); None: the saved ``thresholds``
            (chosen on val by the run), else :data:`trainer.reporting.multilabel.DEFAULT_THRESHOLD` (0.5) each.

    Raises:
        CheckpointError: saved thresholds that are not C numbers in [0, 1] (names ``model.json``).
        ValueError: an ``override`` list whose length is not C.
    """
    multilabel, saved = checkpoint_task(meta)
    if not multilabel:
        return None
    if override is not None:
        values = [float(override)] * num_classes if isinstance(override, (int, float)) else [float(v) for v in override]
        if len(values) != num_classes:
            raise ValueError(f"thresholds: expected 1 or {num_classes} values (one per class), got {len(values)}")
        return values
    if saved is None:
        return [DEFAULT_THRESHOLD] * num_classes
    if not (len(saved) == num_classes and all(isinstance(t, (int, float)) and 0.0 <= t <= 1.0 for t in saved)):
        raise CheckpointError(f"model.json: thresholds must be {num_classes} numbers in [0, 1] (one per class), "
                              f"got {str(saved)[:80]}")
    return [float(t) for t in saved]
