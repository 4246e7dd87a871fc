"""Processes: ``accelerator`` (Accelerator set-up, launcher checks, DDP wrapping), ``signals``
(preemption flags agreed across ranks).

Imports nothing else from ``trainer``.
"""
