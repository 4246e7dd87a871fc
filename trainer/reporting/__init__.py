"""What a run reports: ``metrics`` (exact metrics across ranks), ``tracking`` (``metrics.jsonl`` and
W&B, the only module that touches W&B), ``plots``, ``predictions`` (the best model's val predictions
and mistakes), ``reporter`` (keeps ``reports/`` in step with ``checkpoints/best/``), ``train_meter`` (the periodic
training record: mean loss, images/s), ``multilabel`` (multi-label metrics and thresholds on whole tensors) and
``multilabel_eval`` (the multi-label evaluation state, exact across ranks, and its per-class table),
``multilabel_plots`` (multi-label reports: per-class AP bars, precision-recall curves, the worst-predicted images),
``model_card`` (the ``README.md`` beside ``checkpoints/best/``).

May import ``trainer.config`` and ``trainer.files``.

May import: trainer.config, trainer.files.
"""
