"""``logging``: where metrics go besides ``metrics.jsonl`` (W&B) and the progress bar."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from trainer.config.fields import Section


@dataclass
class LoggingConfig(Section):
    """Where metrics go (besides ``metrics.jsonl``)."""

    _where: ClassVar[str] = "logging"

    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """``auto``: online when a W&B login exists, else offline (sync later with ``wandb sync``)."""
    project: str = "finetune"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    run_name: Optional[str] = None
    """W&B run name (default: the config's ``name``)."""
    progress: bool = True
    """Show a progress bar on the main process."""
