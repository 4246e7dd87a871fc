"""One module per config section, each a :class:`~trainer.config.fields.Section` dataclass whose fields
carry their default, valid range (``num``) and docstring: ``data``, ``model``, ``finetune`` (with
``Phase``), ``optim``, ``train`` (with ``EarlyStoppingConfig``), ``logging``. The whole run's
:class:`~trainer.config.schema.Config` and the rules between sections live in ``trainer/config/schema.py``.

Imports only ``trainer.config.fields``.
"""
