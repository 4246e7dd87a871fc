"""User scripts, runnable as ``python launch/<name>.py`` or, after ``pip install``, as the console scripts of
``pyproject.toml`` (``finetune-predict``, ``finetune-shards``, ``finetune-export``,
``finetune-prefetch-weights``); each has ``--help``.
"""
