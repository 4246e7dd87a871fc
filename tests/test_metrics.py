"""Metrics: exact sums, top-5, per-class accuracy and confusion matrix; split invariance."""

import torch

from trainer.reporting.metrics import EvalAccumulator


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
    assert abs(r.top1 - (pred == labels).float().mean().item()) < 1e-9
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    assert abs(r.top5 - top5) < 1e-6
    assert abs(r.loss - torch.nn.functional.cross_entropy(logits, labels).item()) < 1e-6
    conf = torch.tensor(r.confusion)
    assert conf.sum() == 50 and conf[labels[0], pred[0]] >= 1
    for c in range(6):
        m = labels == c
        if m.any():
            assert abs(r.per_class[c] - (pred[m] == c).float().mean().item()) < 1e-9


def test_two_shards_sum_to_the_whole():
    """Accumulators over disjoint halves, added, equal one accumulator over everything (what all_reduce does)."""
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(31, 3, generator=g), torch.randint(0, 3, (31,), generator=g)
    whole = EvalAccumulator(3)
    whole.update(logits, labels)
    a, b = EvalAccumulator(3), EvalAccumulator(3)
    a.update(logits[:7], labels[:7])
    b.update(logits[7:], labels[7:])
    a.confusion += b.confusion
    a.loss_sum += b.loss_sum
    ra, rw = a.reduce(), whole.reduce()
    assert ra.confusion == rw.confusion and abs(ra.loss - rw.loss) < 1e-6
    assert rw.top5 is None  # fewer than 5 classes
