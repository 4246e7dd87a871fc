"""Metrics: exact sums, top-5, per-class precision / recall / F1, sparse confusion; split invariance;
definitions checked against torchmetrics (an independent implementation)."""

import numpy as np
import pytest
import torch

from trainer.reporting.metrics import EvalAccumulator, count_cells


def test_metrics_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g)
    labels = torch.randint(0, 6, (50,), generator=g)
    acc = EvalAccumulator(6)
    acc.update(logits[:20], labels[:20])
    acc.update(logits[20:], labels[20:])
    r = acc.reduce()
    pred = logits.argmax(1)
    assert r.num_samples == 50
    assert abs(r.top1 - (pred == labels).double().mean().item()) < 1e-12
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert abs(r.top5 - top5) < 1e-6
    assert abs(r.loss - torch.nn.functional.cross_entropy(logits, labels).item()) < 1e-6
    dense = np.zeros((6, 6), dtype=np.int64)
    np.add.at(dense, (labels.numpy(), pred.numpy()), 1)
    assert (r.confusion_dense() == dense).all()
    assert (r.support == dense.sum(1)).all() and (r.predicted == dense.sum(0)).all()
    for c in range(6):
        m = labels == c
        if m.any():
            assert abs(r.per_class[c] - (pred[m] == c).double().mean().item()) < 1e-12


def test_sparse_confusion_rows_are_sorted_off_diagonal_cells():
    # true, pred pairs: (0,1) x3, (2,1) x3, (1,0) x1, diagonal ones must not appear
    cells = np.array([0 * 3 + 1] * 3 + [2 * 3 + 1] * 3 + [1 * 3 + 0] + [4, 8])
    off = cells[cells // 3 != cells % 3]
    assert count_cells(off, 3).tolist() == [[0, 1, 3], [2, 1, 3], [1, 0, 1]]
    assert count_cells(np.array([5, 5, 7]), 3, counts=np.array([2, 1, 4])).tolist() == [[2, 1, 4], [1, 2, 3]]


@pytest.mark.parametrize("c", [3, 7])
def test_macro_metrics_match_torchmetrics(c):
    tm = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(c)
    n = 40
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c - 1, (n,), generator=g)  # the last class never occurs as a true label
    logits[:3, 0] += 10.0  # and some class is predicted often
    acc = EvalAccumulator(c)
    acc.update(logits, labels)
    r = acc.reduce()
    pred = logits.argmax(1)
    kw = dict(num_classes=c)
    m = r.macro()
    assert m["precision"] == pytest.approx(tm.multiclass_precision(pred, labels, average="macro", **kw).item(), abs=1e-6)
    assert m["recall"] == pytest.approx(tm.multiclass_recall(pred, labels, average="macro", **kw).item(), abs=1e-6)
    assert m["f1"] == pytest.approx(tm.multiclass_f1_score(pred, labels, average="macro", **kw).item(), abs=1e-6)
    per_f1 = tm.multiclass_f1_score(pred, labels, average="none", **kw).numpy()
    assert r.f1 == pytest.approx(per_f1, abs=1e-6)
    present = r.support > 0
    assert r.balanced_accuracy == pytest.approx(r.recall[present].mean())
    assert (r.confusion_dense() == tm.multiclass_confusion_matrix(pred, labels, **kw).numpy()).all()


class TwoRanks:
    """Stands in for a 2-process Accelerator: ``reduce`` adds the other rank's packed sums."""

    num_processes = 2

    def __init__(self, other_packed):
        self.other = other_packed

    def reduce(self, t, reduction="sum"):
        return t + self.other


def test_two_ranks_reduce_to_the_single_process_result(monkeypatch):
    """Accumulators over disjoint halves, reduced over 2 ranks, equal one accumulator over everything."""
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(31, 12, generator=g), torch.randint(0, 12, (31,), generator=g)
    whole = EvalAccumulator(12)
    whole.update(logits, labels)
    a, b = EvalAccumulator(12), EvalAccumulator(12)
    a.update(logits[:7], labels[:7])
    b.update(logits[7:], labels[7:])
    other = torch.cat([b.counts.flatten().double(), b.loss_sum.view(1), b.top5_hits.double().view(1)])
    monkeypatch.setattr("accelerate.utils.gather_object", lambda objs: objs + [b.local_confused()])
    ra, rw = a.reduce(TwoRanks(other)), whole.reduce()
    assert ra.confused.tolist() == rw.confused.tolist() and len(rw.confused) > 0
    for f in ("support", "predicted", "correct"):
        assert (getattr(ra, f) == getattr(rw, f)).all()
    assert abs(ra.loss - rw.loss) < 1e-6 and ra.top5 == rw.top5 and ra.as_log() == pytest.approx(rw.as_log())
    assert EvalAccumulator(3).reduce().top5 is None  # fewer than 5 classes


def test_record_is_scalars_only_whatever_the_class_count():
    import json
    for c in (10, 1000):
        acc = EvalAccumulator(c)
        g = torch.Generator().manual_seed(c)
        acc.update(torch.randn(2000, c, generator=g), torch.randint(0, c, (2000,), generator=g))
        rec = acc.reduce().as_log("val/")
        assert all(isinstance(v, (int, float)) for v in rec.values())
        assert len(json.dumps(rec)) < 400
