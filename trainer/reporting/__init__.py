"""What a run reports: ``metrics`` (exact metrics across ranks), ``tracking`` (``metrics.jsonl`` and
W&B, the only module that touches W&B), ``plots``, ``predictions`` (the best model's val predictions
and mistakes), ``reporter`` (keeps ``reports/`` in step with ``checkpoints/best/``), ``train_meter`` (the periodic
training record: mean loss, images/s).

May import ``trainer.config`` and ``trainer.utils``.

May import: trainer.config, trainer.utils.
"""
