"""Writes checkpoints in a loop until killed (tests/test_run_folder.py kills it with SIGKILL).

    python tests/helpers/ckpt_writer.py <output_dir> <first_step>

Each iteration writes ``last.pt`` (``trainer.checkpoint.state.atomic_save``) and the inference
checkpoint ``checkpoints/best/`` (``trainer.checkpoint.inference.save``) with ~16 MB of tensors
each, the way the Trainer does, then prints ``saved <step>`` (flushed) once both are complete.
Prints ``ready`` before the first write.
"""

import sys
from pathlib import Path

import torch

from trainer.checkpoint import state as ckpt_lib
from trainer.checkpoint import inference as infer_ckpt


def main(out: str, first_step: int) -> None:
    out = Path(out)
    g = torch.Generator().manual_seed(first_step)
    weights = {f"layer{i}.weight": torch.randn(512, 1024, generator=g) for i in range(8)}  # 16 MB
    print("ready", flush=True)
    step = first_step
    while True:
        step += 1
        ckpt_lib.atomic_save({"format_version": ckpt_lib.FORMAT_VERSION, "kind": "resume", "step": step,
                              "model": weights, "rng": [ckpt_lib.rng_state()]},
                             ckpt_lib.checkpoint_dir(out) / "last.pt")
        infer_ckpt.save(infer_ckpt.best_dir(out), weights, class_names=["a", "b"], backbone="none",
                        drop_rate=0.0, preprocessing={}, config={}, metrics={"step": step})
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
