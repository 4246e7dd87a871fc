"""The run: ``trainer`` (the Trainer: set-up, restore, epochs, evaluation, checkpoints), ``loop``
(train step with gradient accumulation, evaluation), ``checkpoint`` (``last.pt``, safe loading,
atomic writes), ``inference_checkpoint`` (``checkpoints/best/`` = ``model.safetensors`` +
``model.json``, read by predict / export), ``early_stopping``, ``feature_cache`` (head-only epochs
on cached backbone features).

The only subpackage that wires the others together; nothing else imports it.
"""
