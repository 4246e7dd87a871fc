"""Transfer-learning trainer for image classification.

The subpackages follow the data flow; each may import only the ones listed in its own docstring:

- ``config``    -- the run's configuration: dataclasses with defaults, ranges, YAML/CLI loading.
- ``data``      -- image folder / manifest -> WebDataset shards + ``dataset.json`` -> loaders, decoding.
- ``models``    -- backbones by name, pretrained weights and their offline cache, layer ids.
- ``finetune``  -- what trains and how fast: freezing, param groups, lr schedule, optimizer, losses.
- ``train``     -- the Trainer, the step loop, checkpoints, early stopping, feature cache.
- ``distributed`` -- Accelerate set-up, DDP wrapping, preemption signals.
- ``reporting`` -- metrics, ``metrics.jsonl`` / W&B tracking, plots and error analysis.
- ``files``     -- atomic file writes, checksums, string seeds (standard library only).

``trainer/main.py`` is the command-line entry (``accelerate launch trainer/main.py``).
"""
