"""Metrics output: ``metrics.jsonl`` in the run directory and Weights & Biases.

This is the only module that imports ``wandb``. Only the main process creates a :class:`Tracker`
that writes; other ranks get a no-op tracker (:meth:`Tracker.disabled`), so one job is one W&B run.
Callers reduce metrics across ranks *before* logging.

W&B mode (``logging.wandb``): ``auto`` is ``online`` when a login exists (``WANDB_API_KEY`` or an
entry for api.wandb.ai in ``~/.netrc``) and ``offline`` otherwise - offline runs are kept under
``<output_dir>/wandb`` and can be uploaded later with ``wandb sync``. The run id is stored in every
checkpoint and passed back on resume, so a preempted job continues the same run.

Resume rewinds the history to the checkpoint's step ``S`` (``Tracker(..., resume_step=S)``): a job
killed at step 12 after a checkpoint at step 10 logged steps 11-12 that the resumed job trains again.

* ``metrics.jsonl``: records with ``step > S`` are moved to ``metrics.rewound.jsonl`` (kept, not
  lost), so ``metrics.jsonl`` holds each step once; so are the records *at* ``S`` of an evaluation that the
  checkpoint does not include and the resumed run does again (``redo``: a validation after a checkpoint written
  at an epoch's end by a preemption, an interrupted test evaluation), so each ``(step, kind)`` is recorded once.
* W&B: the run is continued with ``resume_from="<id>?_step=S"`` (W&B's run rewind: the history after
  ``S`` is dropped and logging continues from ``S``), because with ``resume="allow"`` W&B would ignore
  every record whose step is below the run's last step (steps 11-12 of the new job silently lost).
  Rewind is a W&B beta feature: in offline mode the rewind point is stored in the offline run and
  applied by ``wandb sync``; an online server that refuses it makes the tracker fall back to
  ``resume="allow"`` with a warning naming the steps W&B will drop. Offline runs of one job are
  ``<output_dir>/wandb/offline-run-*-<id>`` (one per start, same id); sync them in order.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
from pathlib import Path
from typing import Any

from trainer.files.atomic import atomic_write

log = logging.getLogger("trainer")


def wandb_mode(requested: str) -> str:
    """Resolve ``auto`` to ``online`` / ``offline`` (see module docstring); other values pass through."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc()
        if any(host.endswith("wandb.ai") for host in rc.hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def rewind_metrics(path: str | Path, step: int, redo: tuple[str, ...] = ()) -> int:
    """Move records with ``step`` > ``step`` from ``path`` (metrics.jsonl) to ``metrics.rewound.jsonl``, and the
    records *at* ``step`` holding a key that starts with one of ``redo`` (e.g. ``"val/"``: an evaluation at
    ``step`` logged after the checkpoint was written, which the resumed run does again).

    Rewrites ``path`` atomically (temp file + rename). Unparseable lines (a record cut by a kill)
    are moved too.

    Returns:
        The number of records moved.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            at = row.get("step", 0)
            ok = at < step or (at == step and not any(k.startswith(redo) for k in row))
        except (json.JSONDecodeError, AttributeError, TypeError):
            ok = False
        (keep if ok else moved).append(line)
    if moved:
        with open(path.with_name("metrics.rewound.jsonl"), "a") as f:
            f.write("".join(m + "\n" for m in moved))
        atomic_write(path, "".join(k + "\n" for k in keep))
        log.info("resume at step %d: moved %d records logged after it from %s to metrics.rewound.jsonl",
                 step, len(moved), path.name)
    return len(moved)


class Tracker:
    """Writes metric records to ``metrics.jsonl`` and W&B (main process only).

    Args:
        run_dir: the run's output directory.
        config: resolved config dict (sent to W&B once).
        mode: ``online`` / ``offline`` / ``disabled`` / ``auto``.
        project, entity, run_name: W&B run identity.
        run_id: W&B run id to continue (from a checkpoint), or None for a new run.
        resume_step: the checkpoint's optimizer step when resuming (None: fresh run); history after
            it is rewound (module docstring).
        redo: key prefixes of the records at ``resume_step`` that are rewound too (:func:`rewind_metrics`).
    """

    def __init__(self, run_dir: str | Path, config: dict, *, mode: str = "auto", project: str = "finetune",
                 entity: str | None = None, run_name: str | None = None, run_id: str | None = None,
                 resume_step: int | None = None, redo: tuple[str, ...] = ()):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.rewound = rewind_metrics(self.metrics_path, resume_step, redo) if resume_step is not None else 0
        self._file = open(self.metrics_path, "a", buffering=1)
        self.mode = wandb_mode(mode)
        self._wandb_run = None
        self.run_id = run_id
        if self.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb
            common = dict(project=project, entity=entity, name=run_name, config=config, dir=str(self.run_dir),
                          mode=self.mode, settings=wandb.Settings(console="off", x_disable_stats=True))
            if run_id and resume_step is not None:
                try:
                    self._wandb_run = wandb.init(resume_from=f"{run_id}?_step={resume_step}", **common)
                except Exception as e:  # rewind not supported by this server: continue, say what is lost
                    log.warning("W&B refused to rewind run %s to step %d (%s: %s); continuing it with "
                                "resume='allow': W&B ignores records of steps up to the run's last step "
                                "(metrics.jsonl has them all)", run_id, resume_step, type(e).__name__, e)
                    self._wandb_run = wandb.init(id=run_id, resume="allow", **common)
            else:
                self._wandb_run = wandb.init(id=run_id, resume="allow", **common)
            self.run_id = self._wandb_run.id

    @classmethod
    def disabled(cls) -> "Tracker":
        """A tracker that drops everything (ranks other than the main process)."""
        self = cls.__new__(cls)
        self._file = None
        self._wandb_run = None
        self.run_id = None
        self.mode = "disabled"
        return self

    def log(self, record: dict, *, step: int) -> None:
        """Append one record (``step`` = optimizer step) to metrics.jsonl and W&B."""
        if self._file is None:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _clean(v) for k, v in record.items()})
        self._file.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if v is not None}, step=step)

    def log_images(self, images: dict[str, str | Path], *, step: int) -> None:
        """Send PNG files (already written in the run directory) to W&B as images."""
        if self._wandb_run is not None:
            self._wandb_run.log({k: self._wandb.Image(str(v)) for k, v in images.items()}, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list], *, step: int) -> None:
        """Send a table (e.g. the validation mistakes) to W&B."""
        if self._wandb_run is not None:
            self._wandb_run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict) -> None:
        """Set W&B summary values (e.g. best top-1)."""
        if self._wandb_run is not None:
            for k, v in values.items():
                self._wandb_run.summary[k] = v

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


