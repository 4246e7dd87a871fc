"""The command-line boundary shared by ``trainer/main.py`` and the ``launch/`` scripts: ``commands`` (the one
``finetune COMMAND`` dispatcher), ``args`` (one parser: each value converted once by its option's type),
``help`` (``--help`` text generated from the config dataclasses and function signatures), ``preflight`` (checks
and launcher settings resolved before any expensive set-up) and ``errors`` (a user-fixable failure ends as one
line, printed once, exit status 2; the traceback goes to ``<output_dir>/logs/``).

May import ``trainer.config`` and, lazily, the other subpackages but ``trainer.train`` (which imports
``errors.set_log_dir``); nothing else imports ``trainer.cli`` except the entry points.

May import: trainer.config, trainer.data, trainer.distributed, trainer.finetune, trainer.models, trainer.planner,
trainer.reporting, trainer.selection, trainer.files.
Imported only by: trainer.train.
"""
