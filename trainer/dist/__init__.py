"""Processes: ``accelerator`` (Accelerator set-up, launcher checks, DDP wrapping), ``signals``
(preemption flags agreed across ranks).

Imports nothing else from ``trainer``. ``wait``: work done by the main process while the others wait
without a collective deadline.
"""
