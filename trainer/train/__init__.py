"""The run: ``start`` (``run``: the run folder's plan, then the Trainer), ``trainer`` (the Trainer: set-up,
phases, epochs), ``loop`` (train step with gradient
accumulation, evaluation), ``evaluation`` (validation with raw + EMA weights and what follows it, the
test split), ``ema``, ``linear_probe``, ``checkpointer`` (when and what the run writes and restores),
``checkpoint`` (the ``last.pt`` format; safe loading is :func:`trainer.models.state_dict.safe_torch_load`),
``run_folder``, ``inference_checkpoint`` (``checkpoints/best/`` = ``model.safetensors`` + ``model.json``,
read by predict / export; for timm backbones also timm's ``config.json``, and the model card ``README.md``),
``early_stopping``, ``feature_cache`` (head-only epochs on cached backbone features).

The only subpackage that wires the others together; nothing else imports it.

May import: trainer.cli.errors, trainer.config, trainer.data, trainer.distributed, trainer.finetune, trainer.models,
trainer.planner, trainer.reporting, trainer.utils.
Imported only by: the entry points.
"""
