"""Short trainer runs inside the test process (no interpreter start-up per run) and a small checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run_in_process(images: Path, shard_dir: Path, out_dir: Path, **overrides):
    """``trainer.train.start.run`` on ``configs/ants_bees_lite0.yaml`` with tiny-run overrides; returns RunResult.

    Defaults: 1 loader worker, global batch 8 (micro 4), no augmentation, no W&B, no progress bar.
    ``overrides`` use dotted keys as on the command line: ``**{"train.epochs": 2}``.
    """
    from trainer.config.loading import load_config
    from trainer.train.start import run

    ov = {"data.root": str(images), "data.shard_dir": str(shard_dir), "data.samples_per_shard": 8,
          "data.num_workers": 1, "data.augment": "none", "train.output_dir": str(out_dir),
          "train.global_batch_size": 8, "train.micro_batch_size": 4, "logging.wandb": "disabled",
          "logging.progress": False}
    ov.update(overrides)
    return run(load_config(REPO / "configs/ants_bees_lite0.yaml", ov))


def make_checkpoint(path: Path, class_names=("ants", "bees"), seed: int = 0) -> Path:
    """An inference checkpoint folder at ``path`` (``model.safetensors`` + ``model.json``): Lite0 with its
    offline ImageNet weights and a seeded random head (no training), for export / predict tests."""
    from trainer.config.schema import Config
    from trainer.models.build import build_model
    from trainer.checkpoint import inference as inference_checkpoint

    torch.manual_seed(seed)
    cfg = Config()
    model, pre = build_model(cfg.model.backbone, len(class_names), cfg.model.weights)
    with torch.no_grad():  # a head with clearly non-zero logits
        model.head.weight.normal_(0, 0.05)
        model.head.bias.zero_()
    return inference_checkpoint.save(path, model.state_dict(), class_names=list(class_names),
                                     backbone=cfg.model.backbone, drop_rate=cfg.model.drop_rate,
                                     preprocessing=pre.to_dict(), config=cfg.to_dict(),
                                     metrics={"epoch": 0, "step": 0})
