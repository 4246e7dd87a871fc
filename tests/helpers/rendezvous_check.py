"""Print this process's place in a multi-node launch and check one all-reduce; for rendezvous tests.

    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --num_processes 4 \
        --main_process_ip 127.0.0.1 --main_process_port 29555 tests/helpers/rendezvous_check.py &
    accelerate launch ... --machine_rank 1 ... tests/helpers/rendezvous_check.py

Prints one JSON line per process: rank, local_rank, world_size, group_rank (machine rank), sum.
``sum`` must equal world_size * (world_size - 1) / 2 (all-reduce of the ranks). Exits 2 if not.
Uses gloo with a 30 s collective time-out so a broken setup fails instead of hanging.
"""

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> int:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([rank], dtype=torch.int64)
    dist.all_reduce(value)
    info = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), "world_size": world,
            "group_rank": int(os.environ.get("GROUP_RANK", -1)), "sum": int(value.item())}
    # one write() per line: with PYTHONUNBUFFERED, print() writes text and newline separately and the
    # lines of the processes sharing this pipe could interleave
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (json.dumps(info) + "\n").encode())
    dist.destroy_process_group()
    return 0 if info["sum"] == world * (world - 1) // 2 else 2


if __name__ == "__main__":
    sys.exit(main())
