"""Process setup for one process, DDP over GPUs, or DDP over CPU processes (gloo).

The one trap this module exists for: on a machine without a GPU, a process started by
``accelerate launch --multi_gpu --num_processes N`` or ``torchrun`` only joins a process group if the
``Accelerator`` is built with ``cpu=True``; otherwise every process silently trains its own copy.
:func:`make_accelerator` therefore passes ``cpu=True`` whenever CUDA is absent and then checks that the
world size seen inside equals the one the launcher announced (``WORLD_SIZE``).

The model is NOT wrapped by ``accelerator.prepare``: the training loop wraps it with
:func:`wrap_ddp` itself and re-wraps it after every unfreeze, because DDP records which parameters
need gradients when it is built (a later ``requires_grad`` change would otherwise leave ranks with
different gradients and no error).

Multi-node launches (``accelerate launch --num_machines N --machine_rank R`` per node, or
``slurm/finetune.sh``) get three more checks, so a wrong setting fails within seconds with a message
instead of after a socket time-out: :func:`check_launch_env` (the launcher's variables are complete
and consistent, before the process group is built), the ``DistNetworkError`` of an unreachable
``MASTER_ADDR:MASTER_PORT`` re-raised naming both, and :func:`check_topology` (after init: no two
processes claim the same machine rank + local rank). :func:`shutdown` destroys the process group at
the end, so gloo does not abort (SIGABRT) at interpreter exit and the launcher reports success.

Threads (:func:`configure_threads`, called by :func:`make_accelerator`): each training process runs
torch with ``OMP_NUM_THREADS`` intra-op threads when the launcher or the user set it (``accelerate
launch`` on CPU sets cores / processes per node, torchrun sets 1), else with the cores it may run on
divided by the processes on this node (``LOCAL_WORLD_SIZE``), and one inter-op thread. The loader
workers run one torch thread each at a lower priority (set by :mod:`trainer.data.loader`).
:func:`describe_threads` is the line the trainer logs at start.
"""

from __future__ import annotations

import inspect
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs



class DistributedSetupError(RuntimeError):
    """The process group does not match what the launcher asked for."""


# launcher variable -> the flag of `accelerate launch` / torchrun that sets it (for error messages)
_LAUNCH_FLAGS = {
    "WORLD_SIZE": "--num_processes (accelerate) / --nnodes x --nproc_per_node (torchrun)",
    "RANK": "set by the launcher from --machine_rank / --node_rank",
    "LOCAL_RANK": "set by the launcher per process",
    "LOCAL_WORLD_SIZE": "--num_processes / --num_machines (accelerate) / --nproc_per_node (torchrun)",
    "GROUP_RANK": "--machine_rank (accelerate) / --node_rank (torchrun) / SLURM_NODEID in slurm/finetune.sh",
    "GROUP_WORLD_SIZE": "--num_machines (accelerate) / --nnodes (torchrun)",
    "MASTER_ADDR": "--main_process_ip (accelerate) / --master_addr (torchrun)",
    "MASTER_PORT": "--main_process_port (accelerate) / --master_port (torchrun)",
}


def _env_int(env: dict, name: str) -> int | None:
    if name not in env or env[name] == "":
        return None
    try:
        return int(env[name])
    except ValueError:
        raise DistributedSetupError(f"{name}={env[name]!r} is not an integer ({_LAUNCH_FLAGS[name]})") from None


def check_launch_env(env: dict | None = None) -> None:
    """Check the launcher's variables before the process group is built (no network, no collective).

    Nothing to check without ``WORLD_SIZE`` or with ``WORLD_SIZE=1`` (single process). Otherwise
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` must be set, ``0 <= RANK <
    WORLD_SIZE``, ``0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE``, ``0 <= GROUP_RANK <
    GROUP_WORLD_SIZE``, ``MASTER_PORT`` in 1..65535, and with equal nodes (``WORLD_SIZE ==
    GROUP_WORLD_SIZE x LOCAL_WORLD_SIZE``) ``RANK == GROUP_RANK x LOCAL_WORLD_SIZE + LOCAL_RANK``
    (how torchrun's static rendezvous numbers ranks).

    Args:
        env: the environment to read (default ``os.environ``).

    Raises:
        DistributedSetupError: naming the variable, its value and the launcher flag that sets it.
    """
    env = dict(os.environ if env is None else env)
    world = _env_int(env, "WORLD_SIZE")
    if world is None or world == 1:
        return

    def need(name: str) -> int:
        value = _env_int(env, name)
        if value is None:
            raise DistributedSetupError(f"WORLD_SIZE={world} but {name} is not set ({_LAUNCH_FLAGS[name]}); "
                                        "start the trainer with accelerate launch or torchrun")
        return value

    if world < 1:
        raise DistributedSetupError(f"WORLD_SIZE={world} must be >= 1 ({_LAUNCH_FLAGS['WORLD_SIZE']})")
    rank, local_rank = need("RANK"), need("LOCAL_RANK")
    port = need("MASTER_PORT")
    if not env.get("MASTER_ADDR"):
        raise DistributedSetupError(f"WORLD_SIZE={world} but MASTER_ADDR is not set ({_LAUNCH_FLAGS['MASTER_ADDR']})")
    if not 1 <= port <= 65535:
        raise DistributedSetupError(f"MASTER_PORT={port} is not a TCP port ({_LAUNCH_FLAGS['MASTER_PORT']})")
    if not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}; "
                                    f"{_LAUNCH_FLAGS['RANK']})")
    local_world = _env_int(env, "LOCAL_WORLD_SIZE")
    if local_world is not None:
        if not 1 <= local_world <= world:
            raise DistributedSetupError(f"LOCAL_WORLD_SIZE={local_world} must be in 1..WORLD_SIZE={world} "
                                        f"({_LAUNCH_FLAGS['LOCAL_WORLD_SIZE']})")
        if not 0 <= local_rank < local_world:
            raise DistributedSetupError(f"LOCAL_RANK={local_rank} is outside 0..{local_world - 1} "
                                        f"(LOCAL_WORLD_SIZE={local_world}; {_LAUNCH_FLAGS['LOCAL_RANK']})")
    group_rank, group_world = _env_int(env, "GROUP_RANK"), _env_int(env, "GROUP_WORLD_SIZE")
    if group_rank is not None and group_world is not None:
        if not 0 <= group_rank < group_world:
            raise DistributedSetupError(
                f"GROUP_RANK={group_rank} (machine rank) is outside 0..{group_world - 1} "
                f"(GROUP_WORLD_SIZE={group_world} machines): check {_LAUNCH_FLAGS['GROUP_RANK']}")
        if local_world is not None and world == group_world * local_world and \
                rank != group_rank * local_world + local_rank:
            raise DistributedSetupError(
                f"RANK={rank} but GROUP_RANK={group_rank} x LOCAL_WORLD_SIZE={local_world} + "
                f"LOCAL_RANK={local_rank} = {group_rank * local_world + local_rank}: the launcher's "
                f"variables disagree ({_LAUNCH_FLAGS['GROUP_RANK']})")


def check_topology(accelerator: Accelerator) -> list[tuple[str, int, int]]:
    """After init: all-gather ``(hostname, GROUP_RANK, LOCAL_RANK)`` and fail on duplicates.

    Two processes with the same machine rank and local rank mean two nodes were started with the
    same ``--machine_rank`` (or ``SLURM_NODEID``) and the same rendezvous; their ranks would
    overlap. A collective: every rank must call it.

    Returns:
        The gathered list, indexed by global rank (``[(socket.gethostname(), group_rank, local_rank)]``).

    Raises:
        DistributedSetupError: duplicates, naming the hosts and the machine rank.
    """
    import socket

    me = (socket.gethostname(), int(os.environ.get("GROUP_RANK", 0)), accelerator.local_process_index)
    if accelerator.num_processes == 1:
        return [me]
    import torch.distributed as dist

    everyone: list = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, me)
    seen: dict[tuple[int, int], int] = {}
    for rank, (host, group, local) in enumerate(everyone):
        if (group, local) in seen:
            other = seen[(group, local)]
            raise DistributedSetupError(
                f"ranks {other} (host {everyone[other][0]}) and {rank} (host {host}) both have machine rank "
                f"{group} and local rank {local}: two nodes were started with the same machine rank "
                f"({_LAUNCH_FLAGS['GROUP_RANK']})")
        seen[(group, local)] = rank
    return [tuple(x) for x in everyone]


def shutdown() -> None:
    """Destroy the default process group if one exists (call once at the very end of a run).

    Without it gloo aborts (SIGABRT) while the interpreter exits and the launcher reports the run
    as failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_world_size() -> int:
    """World size announced by the launcher (``WORLD_SIZE`` from torchrun / accelerate launch), 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _use_cpu() -> bool:
    """CPU mode: no CUDA device, or the launcher's ``--cpu`` (``ACCELERATE_USE_CPU``)."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or not torch.cuda.is_available()


def _usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm or container limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(env: dict | None = None) -> int:
    """Set this process's torch threads (see the module docstring) and return the intra-op count.

    ``OMP_NUM_THREADS`` (a positive integer) wins; otherwise usable cores // ``LOCAL_WORLD_SIZE`` (at
    least 1), so N processes on a node never run more threads than it has cores. Inter-op threads: 1
    (eager training has no inter-op parallelism to use; left as is if torch already started them).

    Args:
        env: the environment to read (default ``os.environ``).
    """
    env = os.environ if env is None else env
    omp = str(env.get("OMP_NUM_THREADS", "")).strip()
    if omp.isdigit() and int(omp) > 0:
        threads = int(omp)
    else:
        per_node = int(env.get("LOCAL_WORLD_SIZE") or 1)
        threads = max(1, _usable_cores() // max(1, per_node))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # inter-op pool already in use: keep it
            pass
    return threads


def describe_threads(num_workers: int, worker_threads: int, worker_nice: int) -> str:
    """One line for the start-up log: torch threads of this process, cores, and ``num_workers`` loader workers
    with ``worker_threads`` torch threads at nice ``+worker_nice`` each (the caller passes the loader's
    :data:`trainer.data.loader.WORKER_TORCH_THREADS` / ``WORKER_NICE``: dist does not import data)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    return (f"torch threads {torch.get_num_threads()} intra-op + {torch.get_num_interop_threads()} inter-op "
            f"per process ({_usable_cores()} usable cores, {os.environ.get('LOCAL_WORLD_SIZE', '1')} process(es) "
            f"on this node{f', OMP_NUM_THREADS={omp}' if omp else ''}); {num_workers} loader worker(s) x "
            f"{worker_threads} thread at nice +{worker_nice}")


def make_accelerator(mixed_precision: str, *, timeout_s: int = 600) -> Accelerator:
    """Build the Accelerator for this process.

    Args:
        mixed_precision: ``no``, ``bf16`` or ``fp16``: the value the entry point resolved once
            (:func:`trainer.config.run.resolve_run`, or for inference commands
            :func:`trainer.config.launcher.resolve_mixed_precision`); ``accelerator.mixed_precision`` holds it.
        timeout_s: timeout of collective operations, seconds.

    Returns:
        An ``accelerate.Accelerator`` (gloo on CPU, NCCL on GPU).

    Raises:
        ValueError: an unresolved precision (``auto``). DistributedSetupError: the world size inside differs from ``WORLD_SIZE`` (the run would
            silently train independent copies), fp16 is asked for without a GPU, inconsistent
            launcher variables (:func:`check_launch_env`), an unreachable ``MASTER_ADDR:MASTER_PORT``,
            or two processes with the same machine + local rank (:func:`check_topology`).
    """
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"make_accelerator: mixed_precision must be resolved before (no, bf16 or fp16), got "
                         f"{mixed_precision!r}")
    use_cpu = _use_cpu()
    if use_cpu and mixed_precision == "fp16":
        raise DistributedSetupError(
            "train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    check_launch_env()
    from torch.distributed import DistNetworkError

    try:
        accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=mixed_precision,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
        )
    except DistNetworkError as e:
        raise DistributedSetupError(
            f"cannot reach the rendezvous at MASTER_ADDR:MASTER_PORT = {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} (rank {os.environ.get('RANK')}): {e}. Check "
            f"{_LAUNCH_FLAGS['MASTER_ADDR']} and {_LAUNCH_FLAGS['MASTER_PORT']}: the main node's "
            "address and a free port reachable from every node") from e
    expected = launched_world_size()
    if accelerator.num_processes != expected:
        raise DistributedSetupError(
            f"launcher asked for world_size={expected} (WORLD_SIZE) but this process sees "
            f"world_size={accelerator.num_processes}: the run would train independent copies. "
            "On CPU launch with `accelerate launch --multi_gpu --num_processes N` or torchrun.")
    check_topology(accelerator)
    configure_threads()
    return accelerator


def wrap_ddp(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel when more than one process runs, else return it.

    Call again after every change of ``requires_grad`` (see module docstring): DDP registers the
    trainable parameters at construction and broadcasts rank 0's parameters and buffers, so all ranks
    start the new phase identical; buffers (BN statistics) are broadcast from rank 0 at each forward so
    they stay identical too. ``find_unused_parameters`` stays off: every trainable parameter is
    used in each forward pass.
    """
    if accelerator.num_processes == 1:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise DistributedSetupError("no trainable parameter: nothing for DDP to synchronise")
    device_ids = [accelerator.local_process_index] if accelerator.device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # newer torch renamed broadcast_buffers to forward_sync_buffers (same meaning when True)
    sync = ({"forward_sync_buffers": True} if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": True})
    return ddp(model, device_ids=device_ids, gradient_as_bucket_view=True, **sync)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP (or torch.compile) wrapper."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def check_replicas(model: torch.nn.Module, accelerator) -> float:
    """Largest difference between ranks of any parameter's fingerprint (sum and sum of squares).

    DDP keeps replicas identical by construction; this is the run-time proof (0.0 expected). A
    non-zero value means ranks trained different models (e.g. a phase change DDP did not see), and
    the run stops with an error rather than silently saving rank 0's copy.

    Raises:
        RuntimeError: the replicas differ by more than 1e-6.
    """
    with torch.no_grad():
        fp = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()])
                          for p in model.parameters()]).flatten()
    allfp = accelerator.gather(fp.to(accelerator.device)).view(accelerator.num_processes, -1)
    diff = (allfp - allfp[0]).abs().max().item()
    if diff > 1e-6:
        raise RuntimeError(f"DDP replicas differ across ranks (max fingerprint difference {diff:g})")
    return diff
