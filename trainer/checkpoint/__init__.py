"""Checkpoints and the run folder: everything a run writes to be resumed or shipped, and every way it is read back.

- ``state``: the resume state ``last.pt`` (model, optimizer, EMA, RNG of every rank, progress) and its
  format; loading is always :func:`trainer.models.state_dict.safe_torch_load` (``weights_only=True``, the
  project's one ``torch.load``);
- ``files``: the files of ``checkpoints/`` (step checkpoints kept and rotated, the newest intact one,
  set-aside broken files, rewinding);
- ``checkpointer``: when and what a run writes and restores (``last.pt``, ``checkpoints/best/``);
- ``inference``: the inference checkpoint ``checkpoints/best/`` (``model.safetensors`` + ``model.json``,
  timm's ``config.json``), read by predict, evaluate and export; ``card``: its model card ``README.md``;
  ``labels``: the task and the multi-label decision thresholds it records, one rule for predict, evaluate and
  export;
- ``run_folder``: the run-folder contract (start, resume or refuse; what may differ on resume; no stale files).

May import: trainer.config, trainer.data, trainer.distributed, trainer.models, trainer.reporting, trainer.files.
Imported only by: trainer.train.
"""
