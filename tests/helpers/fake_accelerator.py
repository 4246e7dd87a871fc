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


def run_two_ranks(call) -> tuple[dict, list[int]]:
    """``call(rank, gather_object)`` on two threads, ranks 0 and 1, whose ``gather_object(obj)`` stands in for
    ``accelerate.utils.gather_object``: it waits for both ranks and returns rank 0's list then rank 1's.

    Returns:
        ``({rank: call's result}, the ranks in the order they called gather_object)``.
    """
    import threading

    barrier, box, out, calls = threading.Barrier(2), {}, {}, []

    def gather(obj, rank):
        calls.append(rank)
        box[rank] = obj
        barrier.wait()
        return box[0] + box[1]

    def run(rank):
        out[rank] = call(rank, lambda o: gather(o, rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return out, calls
