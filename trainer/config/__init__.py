"""The run's configuration: ``fields`` (how a field declares its default and valid range), ``sections/``
(one dataclass module per config section), ``schema`` (the whole ``Config`` and the rules between
sections; it re-exports every section class), ``launcher`` (values a launcher may set), ``loading``
(YAML + ``--section.key=value`` overrides -> a checked ``Config``) and ``run`` (``resolve_run``: the
config with its launcher and machine settings resolved once per process, a frozen ``ResolvedRun``).

Imports only ``trainer.files`` from ``trainer``.

May import: trainer.files.
"""
