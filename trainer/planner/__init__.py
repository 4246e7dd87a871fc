"""The time-budget planner: from the user's images, this machine and a wall-clock budget to the run that
gives the best model inside it (``finetune.strategy: auto``, ``train.time_budget``).

- ``budget``: the budget in seconds (``train.time_budget``, else the Slurm job's end time) and the deadline;
- ``rates``: measured images/s and peak memory of backbone x input size on this machine, kept in a
  per-machine cache;
- ``rules``: the decisions (input size, strategy, length, batch sizes, evaluations) as small functions of
  the data survey (:mod:`trainer.data.survey`) and the rates, each with the measurement behind it (docs/planner.md);
- ``plan``: the :class:`~trainer.planner.plan.Plan` (stages, expected minutes, the config values it sets),
  its table, ``plan.json``, and :func:`~trainer.planner.plan.apply_plan`.

May import: trainer.config, trainer.data, trainer.models, trainer.selection, trainer.distributed, trainer.files.
Imported only by trainer.train and trainer.cli (and the entry points).
"""
