"""A stand-in for the parts of ``accelerate.Accelerator`` that ``trainer.train.loop`` uses, for one CPU process."""

import torch


class CpuAccelerator:
    """One CPU process, no mixed precision: ``device``, ``num_processes``, ``autocast``, ``backward``, ``reduce``."""

    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def autocast():
        return torch.autocast("cpu", enabled=False)

    @staticmethod
    def backward(loss):
        loss.backward()

    @staticmethod
    def reduce(t, reduction="sum"):
        return t
