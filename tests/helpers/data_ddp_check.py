"""Run by tests/test_data_ddp.py under ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU).

Each rank reads the train shards with 2 loader workers for 2 epochs, doing one all_reduce per batch
as a training step would (a rank with fewer batches would hang the other: the test's timeout
catches that), then gathers keys and counts; rank 0 writes them to ``argv[2]`` as JSON.

    torchrun --standalone --nproc_per_node 2 tests/helpers/data_ddp_check.py SHARD_DIR OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


from trainer.data.loader import EvalLoader, TrainLoader  # noqa: E402
from trainer.data.sources import resolve_shards, steps_per_epoch
from trainer.data.transforms import build_transforms  # noqa: E402


def main(shard_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert int(os.environ["LOCAL_RANK"]) == rank
    train = resolve_shards(f"{shard_dir}/train-*.tar")
    val = resolve_shards(f"{shard_dir}/val-*.tar")
    micro = 8
    num_batches = steps_per_epoch(96, micro * world)
    loader = TrainLoader(train, rank=rank, world_size=world, micro_batch_size=micro, num_workers=2,
                         transform=build_transforms(8, train=True), seed=3, shuffle_buffer=8)
    epochs = []
    for epoch in range(2):
        keys, steps = [], 0
        for batch in loader.epoch(epoch, num_batches):
            t = torch.tensor([float(batch["image"].shape[0])])
            dist.all_reduce(t)  # lockstep: every rank must reach the same number of collectives
            keys += batch["key"]
            steps += 1
        epochs.append({"keys": keys, "steps": steps})
    loader.close()
    ev = EvalLoader(val, rank=rank, world_size=world, micro_batch_size=5, num_workers=2,
                    transform=build_transforms(8, train=False))
    eval_keys = [k for b in ev for k in b["key"]]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "epochs": epochs, "eval": eval_keys})
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
