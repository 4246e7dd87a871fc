"""Test helper (failure case 9): train across a phase change under DDP and save every rank's weights.

Run under ``accelerate launch --multi_gpu --num_processes 2 tests/helpers/ddp_phase_step.py OUT MODES``
(or torchrun). It uses the trainer's own pieces the way ``trainer/train/trainer.py`` does: ``build_model`` +
``layer_ids``, one ``build_optimizer`` for the whole run, ``apply_phase`` then ``wrap_ddp`` at each
phase change, and ``train_step``. Each rank feeds *different* random images (seeded by rank), so
ranks only stay identical if DDP all-reduces the gradients of exactly the trainable parameters.

MODES (comma-separated, run one after the other in the same process group):
    ``unfreeze``: epoch 0 trains the head only, epoch 1 everything.
    ``freeze``:   epoch 0 trains everything, epoch 1 the head only (parameters that *became* frozen).

Writes ``OUT/{mode}_rank{r}_epoch{e}.pt`` (``{"state": model.state_dict(), "trainable": [names]}``) after
the ``STEPS`` optimizer steps of each epoch, and ``OUT/{mode}_rank{r}_init.pt`` before training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from trainer.config.schema import FinetuneConfig, OptimConfig
from trainer.distributed.accelerator import make_accelerator, unwrap, wrap_ddp
from trainer.finetune.freezing import apply_phase
from trainer.finetune.optim import build_optimizer
from trainer.finetune.schedule import Phase
from trainer.models.build import build_model
from trainer.models.layers import layer_ids
from trainer.train.loop import train_step

STEPS = 2  # optimizer steps per epoch
MICRO, ACCUM, SIZE = 2, 2, 64  # micro batch, grad accumulation, image side (pixels)


def main(out: str, modes: str) -> None:
    accelerator = make_accelerator("no", timeout_s=120)
    for mode in modes.split(","):
        run_mode(Path(out), mode, accelerator)


def run_mode(out_dir: Path, mode: str, accelerator) -> None:
    """Two epochs of ``STEPS`` steps with the phase change of ``mode`` (see module docstring)."""
    rank = accelerator.process_index
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model, _ = build_model("resnet18", 3, "none")
    layer_of, num_layers = layer_ids(model, "resnet18")
    optimizer, _, _ = build_optimizer(model, layer_of, num_layers, OptimConfig(lr=1e-2, weight_decay=0.01),
                                      FinetuneConfig())
    optimizer = accelerator.prepare_optimizer(optimizer)
    phases = {"unfreeze": [Phase(0, "head"), Phase(1, "all")],
              "freeze": [Phase(0, "all"), Phase(1, "head")]}[mode]
    gen = torch.Generator().manual_seed(1000 + rank)  # different data on each rank

    def batches():
        while True:
            yield {"image": torch.randint(0, 256, (MICRO, 3, SIZE, SIZE), dtype=torch.uint8, generator=gen),
                   "label": torch.randint(0, 3, (MICRO,), generator=gen)}

    stream = batches()
    criterion = torch.nn.CrossEntropyLoss()
    torch.save({"state": model.state_dict()}, out_dir / f"{mode}_rank{rank}_init.pt")
    for epoch, phase in enumerate(phases):
        apply_phase(unwrap(model), layer_of, num_layers, phase)
        ddp_model = wrap_ddp(unwrap(model), accelerator)
        ddp_model.train()
        for _ in range(STEPS):
            train_step(ddp_model, stream, optimizer=optimizer, criterion=criterion, accelerator=accelerator,
                       grad_accum_steps=ACCUM, grad_clip=1.0)
        trainable = [n for n, p in unwrap(model).named_parameters() if p.requires_grad]
        torch.save({"state": unwrap(model).state_dict(), "trainable": trainable},
                   out_dir / f"{mode}_rank{rank}_epoch{epoch}.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
