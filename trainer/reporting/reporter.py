"""Reporter: what the Trainer calls at each evaluation to keep ``reports/`` in step with ``best.pt``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trainer.reporting.plots import (
    FILES,
    plot_confusion_matrix,
    plot_per_class_accuracy,
    plot_training_curves,
    reports_dir,
)
from trainer.reporting.predictions import (
    PredictionCollector,
    Predictions,
    plot_mistakes,
    write_predictions_csv,
)

log = logging.getLogger("trainer")


# ---------------------------------------------------------------------------------------------
# run glue


class Reporter:
    """What ``trainer/train/trainer.py`` calls: collect at each evaluation, write reports for the best model.

    Args:
        output_dir: run directory (reports go to ``output_dir/reports``).
        class_names: C names in label order.
        accelerator: for gathering predictions and knowing the main process.
        tracker: :class:`trainer.reporting.tracking.Tracker` (no-op on other ranks).
        num_mistakes: images in the mistakes grid.
        max_table_rows: rows of the W&B mistakes table (most confident first).
    """

    def __init__(self, output_dir: str | Path, class_names: Sequence[str], accelerator, tracker, *,
                 num_mistakes: int = 16, max_table_rows: int = 1000):
        self.dir = reports_dir(output_dir)
        self.metrics_path = Path(output_dir) / "metrics.jsonl"
        self.class_names = list(class_names)
        self.accelerator = accelerator
        self.tracker = tracker
        self.num_mistakes = num_mistakes
        self.max_table_rows = max_table_rows

    def collector(self) -> PredictionCollector:
        """A fresh ``on_batch`` callback for one evaluation."""
        return PredictionCollector(self.num_mistakes)

    def after_eval(self, result, collector: PredictionCollector, *, improved: bool, step: int,
                   epoch: int | None = None) -> None:
        """After an evaluation (every rank calls it). If ``improved`` (``best.pt`` was just written),
        gather the predictions and rewrite confusion matrix, per-class accuracy, mistakes grid and
        predictions CSV, and send them to W&B.

        Args:
            result: the reduced :class:`trainer.reporting.metrics.EvalResult` of this evaluation.
        """
        if not improved:
            return
        pred = collector.gather(self.accelerator)
        if pred is None:  # not the main process
            return
        title = f"best model: step {step}" + (f", epoch {epoch}" if epoch is not None else "")
        paths = self.write_best(result, pred, title=title)
        mistakes = pred.all_mistakes()
        self.tracker.log_images({f"reports/{k}": v for k, v in paths.items() if k != "predictions"}, step=step)
        self.tracker.log_table("reports/val_mistakes", ["key", "true", "pred", "prob_pred", "prob_true"],
                               [[k, self.class_names[t], self.class_names[p], pp, pt]
                                for k, t, p, pp, pt in mistakes[: self.max_table_rows]], step=step)

    def write_best(self, result, pred: Predictions, *, title: str = "") -> dict[str, Path]:
        """Write the four best-model reports; returns ``{"confusion"|"per_class"|"mistakes"|"predictions": path}``."""
        cm = np.asarray(result.confusion)
        wrong = int(cm.sum() - np.trace(cm))
        out = {
            "confusion": plot_confusion_matrix(cm, self.class_names, self.dir / FILES["confusion"], title=title),
            "per_class": plot_per_class_accuracy(result.per_class, self.class_names, self.dir / FILES["per_class"],
                                                 class_counts=cm.sum(axis=1).tolist(), title=title),
            "mistakes": plot_mistakes(pred.mistakes, self.class_names, self.dir / FILES["mistakes"],
                                      num_wrong=wrong, num_samples=int(cm.sum()), title=title),
            "predictions": write_predictions_csv(pred, self.class_names, self.dir / FILES["predictions"]),
        }
        log.info("reports for the best model (%s) in %s", title, self.dir)
        return out

    def finish(self, step: int) -> None:
        """At the end of the run (main process): draw the training curves and send them to W&B."""
        if not self.accelerator.is_main_process or not self.metrics_path.is_file():
            return
        path = plot_training_curves(self.metrics_path, self.dir / FILES["curves"])
        self.tracker.log_images({"reports/training_curves": path}, step=step)


def main(output_dir: str) -> None:
    """``python -m trainer.reporting.reporter <output_dir>``: redraw ``reports/training_curves.png`` from metrics.jsonl."""
    path = plot_training_curves(Path(output_dir) / "metrics.jsonl", reports_dir(output_dir) / FILES["curves"])
    print(path)


if __name__ == "__main__":
    import fire

    fire.Fire(main)


