"""Read the records of an offline W&B run file (``offline-run-*/run-<id>.wandb``) without a network.

The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by LevelDB-log blocks of
32 KiB; each chunk has a 7-byte header (crc32, length uint16 LE, type: 1 full, 2 first, 3 middle,
4 last) and carries part of one serialized ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path):
    """Yield ``wandb_internal_pb2.Record`` messages of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def summary(run_dir: Path) -> dict:
    """``{"run_id", "branch_point": (run, step) or None, "history": [(step, {key: value})]}`` of an offline run."""
    (path,) = Path(run_dir).glob("*.wandb")
    out = {"run_id": None, "branch_point": None, "history": []}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            if rec.run.HasField("branch_point") and rec.run.branch_point.run:
                out["branch_point"] = (rec.run.branch_point.run, rec.run.branch_point.value)
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out["history"].append((rec.history.step.num, items))
    return out
