"""The run's configuration: ``schema`` (dataclasses, one per section, with documented defaults and
valid ranges) and ``loading`` (YAML + ``--section.key=value`` overrides -> a checked ``Config``).

Imports only ``trainer.utils`` from ``trainer``.
"""
