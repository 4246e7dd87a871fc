"""Preemption: SIGUSR1 / SIGTERM set a flag; all ranks agree to stop at the same optimizer step.

Design (who does what when a Slurm job is about to be stopped):

1. Slurm signals. ``slurm/finetune.sh`` asks for ``#SBATCH --signal=B:USR1@120``: 120 s before
   the time limit the *batch shell* gets SIGUSR1. Its trap forwards the signal to the job steps'
   processes (``scancel --signal=USR1 $SLURM_JOB_ID``: every task of every step, on every node,
   but not the batch shell itself). On preemption, ``scancel`` or the time limit, Slurm sends
   SIGTERM to every process itself, then SIGKILL after ``KillWait`` (cluster setting, often 30 s).
   ``accelerate launch`` / ``torchrun`` agents forward these signals to their workers when
   started with ``PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`` (the script sets
   it) and wait ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds for them before killing them.
2. In each training process :class:`PreemptionHandler`'s handler only records the signal (no
   I/O, no collective, no checkpoint: a handler runs between two bytecodes of whatever the main
   thread was doing, possibly inside a collective or a file write).
3. The loop calls :meth:`PreemptionHandler.should_stop` once per optimizer step. It all-reduces
   (MAX) the local flag, so a signal that reached only one rank (or reached ranks at different
   steps) makes every rank stop after the same step, and no rank waits in a collective that the
   others never enter.
4. The loop then writes one checkpoint (atomically, ``trainer/checkpoint/state.py``), waits for all
   ranks (``accelerator.wait_for_everyone()``, so no rank exits while rank 0 still writes) and
   the process exits with :data:`PREEMPTED_EXIT_CODE` (0): the checkpoint is complete, nothing
   failed, and the launcher's other workers are not torn down as "failed".
5. Requeueing is done by exactly one party: the batch script's trap, once, after the training
   step has ended (requeueing a running job would kill it before its checkpoint is written). The
   trainer never requeues; a batch file of your own that runs the trainer requeues the same way.
6. The requeued job starts the same command; the trainer resumes from the latest complete
   checkpoint in its output directory (``SLURM_RESTART_COUNT`` tells it is a restart).
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 0
"""Exit status of a training process that stopped after a preemption checkpoint (see module doc)."""

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Records SIGUSR1 / SIGTERM in a flag; :meth:`should_stop` makes all ranks agree on it.

    Usage (in the training loop, every rank)::

        handler = PreemptionHandler().install()
        try:
            for step in ...:
                train_step(...)                       # one optimizer step
                if handler.should_stop(accelerator):  # collective: every rank, every step
                    save_checkpoint(...); accelerator.wait_for_everyone(); break
        finally:
            handler.restore()

    Attributes:
        received_signal: the first signal number received by this process (``None`` if none).
        agreed_signal: after :meth:`should_stop` returned True, the largest signal number any
            rank received (so all ranks report the same one); else ``None``.
        signals: the signals handled.
    """

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received_signal: int | None = None
        self.agreed_signal: int | None = None
        self._previous: dict[int, Any] = {}

    # -- handler: runs in the main thread between bytecodes; must only set the flag --------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received_signal is None:
            self.received_signal = signum

    def install(self) -> "PreemptionHandler":
        """Register the handlers (remembering the previous ones). Returns ``self``.

        Raises:
            RuntimeError: already installed, or not called from the main thread (Python only
                runs signal handlers there; ``signal.signal`` raises ValueError otherwise).
        """
        if self._previous:
            raise RuntimeError("PreemptionHandler.install(): already installed")
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError as e:
            self.restore()
            raise RuntimeError(f"PreemptionHandler.install() must run in the main thread: {e}") from e
        return self

    def restore(self) -> None:
        """Put back the handlers that were active before :meth:`install` (no-op if not installed)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def should_stop(self, accelerator: Any = None) -> bool:
        """Whether any rank received a signal; the same answer on every rank.

        A collective when ``torch.distributed`` is initialized with more than one process: every
        rank must call it at the same point (once per optimizer step). Cost: one all-reduce of
        one int64 on ``accelerator.device`` (the device the process group's backend needs: CUDA
        for NCCL, CPU for gloo).

        Args:
            accelerator: an ``accelerate.Accelerator`` (only ``.device`` is used) or ``None``
                (single process, or CPU tensors).

        Returns:
            True on every rank if any rank received SIGUSR1/SIGTERM; then ``agreed_signal`` is set.
        """
        local = self.received_signal or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = accelerator.device if accelerator is not None else torch.device("cpu")
            flag = torch.tensor([local], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            agreed = int(flag.item())
        else:
            agreed = local
        if agreed:
            self.agreed_signal = agreed
        return bool(agreed)
