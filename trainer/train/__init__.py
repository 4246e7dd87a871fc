"""The run: ``start`` (``run``: the run folder's plan, then the Trainer), ``components`` (the parts of a run,
built before the Trainer: launch, data, length, model parts, loaders, logging), ``trainer`` (the Trainer: their
composition; phases, epochs), ``epoch`` (one epoch's optimizer steps), ``loop`` (train step with gradient
accumulation, evaluation), ``evaluation`` (validation with raw + EMA weights and what follows it, the test split),
``budgeted`` (the planned run's step count kept to its budget), ``ema``, ``probe_stage`` (a run's linear-probe
stage: features, then :mod:`trainer.finetune.linear_probe`), ``early_stopping``, ``feature_cache`` / ``spill``
(head-only epochs on cached backbone features).
Checkpoints and the run folder are :mod:`trainer.checkpoint`.

The only subpackage that wires the others together; nothing else imports it.

May import: trainer.checkpoint, trainer.cli.errors, trainer.config, trainer.data, trainer.distributed,
trainer.finetune, trainer.models, trainer.planner, trainer.reporting, trainer.files.
Imported only by: the entry points.
"""
