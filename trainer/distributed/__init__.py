"""Processes: ``accelerator`` (Accelerator set-up, launcher checks, DDP wrapping), ``signals``
(preemption flags agreed across ranks).

``wait``: work done by the main process while the others wait without a collective deadline. Imports
only ``trainer.config`` (the launcher's mixed-precision setting) from ``trainer``.

May import: trainer.config.
"""
