"""Reporter: what the Trainer calls at each evaluation to keep ``reports/`` in step with ``checkpoints/best/``."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

from trainer.reporting.multilabel_eval import MultiLabelResult, write_per_class_csv
from trainer.reporting.multilabel_plots import FILES as ML_FILES
from trainer.reporting.multilabel_plots import (
    LabelSetCollector,
    LabelSetMistake,
    plot_ap_per_class,
    plot_label_set_mistakes,
    plot_pr_curves,
)
from trainer.reporting.plots import (
    FILES,
    MAX_MATRIX_CLASSES,
    plot_confused_pairs,
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
from trainer.files.atomic import atomic_write

log = logging.getLogger("trainer")

PER_CLASS_COLUMNS = ["class", "support", "predicted", "correct", "precision", "recall", "f1"]
PAIRS_COLUMNS = ["true", "pred", "count", "fraction_of_true"]


def _write_csv(path: Path, columns: list[str], rows: list[list]) -> Path:
    """Write a CSV atomically (``trainer.files.atomic.atomic_write``); floats with 6 significant digits, NaN empty."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(columns)
    w.writerows([[("" if v != v else f"{v:.6g}") if isinstance(v, float) else v for v in r] for r in rows])
    return atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# run glue


class Reporter:
    """What the run (``trainer/train/``) calls: per-class tables at each evaluation, full reports for the best model.

    Files (main process), for the record prefix ``val/`` (``test/``, ``val_ema/`` alike, stem ``test``,
    ``val_ema``):

    * every evaluation: ``reports/latest/val_per_class.csv`` (class, support, predicted, correct,
      precision, recall, f1) and ``reports/latest/val_confused_pairs.csv`` (every non-zero off-diagonal
      cell of the confusion matrix, most frequent first: with the ``correct`` column, the whole matrix,
      sparse), and the same rows (capped at ``max_table_rows``) as W&B tables;
    * when the monitored metric improved (``checkpoints/best/`` was just written): the same two tables in
      ``reports/``, the confusion plot, per-class plot, mistakes grid and the predictions CSV.

    Multi-label runs (:meth:`after_eval_multilabel`): ``latest/val_per_class.csv`` at every evaluation; for the best
    model ``val_per_class.csv``, ``val_ap_per_class.png``, ``val_pr_curves.png`` and ``val_mistakes.png``
    (:meth:`write_multilabel`; the test split's ``test_*`` alike).

    Args:
        output_dir: run directory (reports go to ``output_dir/reports``).
        class_names: C names in label order.
        accelerator: for gathering predictions and knowing the main process.
        tracker: :class:`trainer.reporting.tracking.Tracker` (no-op on other ranks).
        num_mistakes: images in the mistakes grid.
        max_table_rows: rows of each W&B table (worst classes / most frequent confusions / most
            confident mistakes first); the CSV files hold every row.
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
                   epoch: int | None = None, prefix: str = "val/") -> None:
        """After an evaluation (every rank calls it): write the tables of this evaluation; if ``improved``
        also gather the predictions and rewrite the best-model reports, and send them to W&B.

        Args:
            result: the reduced :class:`trainer.reporting.metrics.EvalResult` of this evaluation.
            prefix: the records' prefix (``val/``); names the files and W&B keys.
        """
        stem = prefix.strip("/")
        if self.accelerator.is_main_process:
            per_class, pairs = self.write_tables(result, self.dir / "latest", stem)
            cap = self.max_table_rows
            worst = sorted(per_class, key=lambda r: (r[5] if r[5] == r[5] else 2.0, r[0]))[:cap]
            self.tracker.log_table(f"reports/{stem}_per_class", PER_CLASS_COLUMNS, worst, step=step)
            self.tracker.log_table(f"reports/{stem}_confused_pairs", PAIRS_COLUMNS, pairs[:cap], step=step)
        if not improved:
            return
        pred = collector.gather(self.accelerator)
        if pred is None:  # not the main process
            return
        title = f"best model: step {step}" + (f", epoch {epoch}" if epoch is not None else "")
        self.write_tables(result, self.dir, stem)
        paths = self.write_best(result, pred, title=title)
        mistakes = pred.all_mistakes()
        self.tracker.log_images({f"reports/{k}": v for k, v in paths.items() if k != "predictions"}, step=step)
        self.tracker.log_table(f"reports/{stem}_mistakes", ["key", "true", "pred", "prob_pred", "prob_true"],
                               [[k, self.class_names[t], self.class_names[p], pp, pt]
                                for k, t, p, pp, pt in mistakes[: self.max_table_rows]], step=step)

    def write_tables(self, result, folder: Path, stem: str = "val") -> tuple[list[list], list[list]]:
        """Write ``<stem>_per_class.csv`` and ``<stem>_confused_pairs.csv`` into ``folder`` (atomically).

        Returns:
            (per-class rows, confused-pair rows) as written, columns :data:`PER_CLASS_COLUMNS` and
            :data:`PAIRS_COLUMNS`.
        """
        names = self.class_names
        per_class = [[names[i], int(result.support[i]), int(result.predicted[i]), int(result.correct[i]),
                      float(p), float(r), float(f)]
                     for i, (p, r, f) in enumerate(zip(result.precision, result.recall, result.f1))]
        pairs = [[names[t], names[p], int(n), float(n / result.support[t])] for t, p, n in result.confused]
        _write_csv(folder / f"{stem}_per_class.csv", PER_CLASS_COLUMNS, per_class)
        _write_csv(folder / f"{stem}_confused_pairs.csv", PAIRS_COLUMNS, pairs)
        return per_class, pairs

    def write_best(self, result, pred: Predictions, *, title: str = "", split: str = "val") -> dict[str, Path]:
        """Write the four best-model reports of ``split``; returns ``{"confusion"|"per_class"|"mistakes"|
        "predictions": path}``. Validation reports have the names of ``FILES``; another split's names
        start with ``<split>_`` (``test_confusion_matrix.png``, ``test_predictions.csv``, ...)."""
        names = {k: v if split == "val" else f"{split}_{v.removeprefix('val_')}" for k, v in FILES.items()}
        n = result.num_samples
        wrong = n - int(result.correct.sum())
        c = len(self.class_names)
        if c > MAX_MATRIX_CLASSES:
            confusion = plot_confused_pairs(result.confused, result.support, self.class_names,
                                            self.dir / names["confusion"],
                                            title=f"{title}\n{c} classes, {n} {split} samples, top-1 {result.top1:.3f}")
        else:
            confusion = plot_confusion_matrix(result.confusion_dense(), self.class_names,
                                              self.dir / names["confusion"], title=title)
        out = {
            "confusion": confusion,
            "per_class": plot_per_class_accuracy(result.per_class, self.class_names, self.dir / names["per_class"],
                                                 class_counts=result.support.tolist(), title=title),
            "mistakes": plot_mistakes(pred.mistakes, self.class_names, self.dir / names["mistakes"],
                                      num_wrong=wrong, num_samples=n, title=title),
            "predictions": write_predictions_csv(pred, self.class_names, self.dir / names["predictions"]),
        }
        log.info("reports for the best model (%s) in %s", title, self.dir)
        return out

    # multi-label (data.task: multilabel): per-class table, AP bars, PR curves, mistakes grid

    def label_set_collector(self, thresholds=None) -> LabelSetCollector:
        """A fresh multi-label ``on_batch`` callback keeping the ``num_mistakes`` worst-predicted images
        (``thresholds``: the evaluation's ``(C,)`` thresholds, None when chosen after the pass)."""
        return LabelSetCollector(self.num_mistakes, thresholds)

    def write_multilabel(self, result: MultiLabelResult, mistakes: Sequence[LabelSetMistake] | None, *,
                         split: str = "val", title: str = "") -> dict[str, Path]:
        """Main process: write ``<split>_per_class.csv``, ``<split>_ap_per_class.png``, ``<split>_pr_curves.png``
        and ``<split>_mistakes.png`` into ``reports/`` (:mod:`trainer.reporting.multilabel_plots`).

        Args:
            result: the reduced :class:`MultiLabelResult` (with its score histograms).
            mistakes: the gathered worst predictions (:meth:`LabelSetCollector.gather`); None: no grid.

        Returns:
            ``{"per_class" | "ap" | "pr" | "mistakes": path}``.
        """
        names = {k: self.dir / f"{split}_{v}" for k, v in ML_FILES.items()}
        out = {"per_class": write_per_class_csv(result, self.class_names, self.dir / f"{split}_per_class.csv"),
               "ap": plot_ap_per_class(result, self.class_names, names["ap"], title=title, split=split),
               "pr": plot_pr_curves(result, self.class_names, names["pr"], title=title, split=split)}
        if mistakes is not None:
            out["mistakes"] = plot_label_set_mistakes(mistakes, self.class_names, result.thresholds, names["mistakes"],
                                                      num_wrong_sets=result.num_samples - result.exact_sets,
                                                      num_samples=result.num_samples, title=title, split=split)
        log.info("multi-label reports (%s) in %s", title or split, self.dir)
        return out

    def after_eval_multilabel(self, result: MultiLabelResult, collector: LabelSetCollector | None, *, improved: bool,
                              step: int, epoch: int | None = None) -> None:
        """After a multi-label validation (every rank calls it): ``reports/latest/val_per_class.csv``; if
        ``improved`` (``checkpoints/best/`` was just written) gather the worst predictions and rewrite the
        ``reports/val_*`` files of :meth:`write_multilabel`, and send the plots to W&B."""
        if self.accelerator.is_main_process:
            write_per_class_csv(result, self.class_names, self.dir / "latest" / "val_per_class.csv")
        if not improved:
            return
        mistakes = collector.gather(self.accelerator, result.thresholds) if collector is not None else None
        if not self.accelerator.is_main_process:
            return
        title = f"best model: step {step}" + (f", epoch {epoch}" if epoch is not None else "")
        paths = self.write_multilabel(result, mistakes, split="val", title=title)
        self.tracker.log_images({f"reports/val_{k}": v for k, v in paths.items() if k != "per_class"}, step=step)

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


