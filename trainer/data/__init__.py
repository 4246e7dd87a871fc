"""Data, from the user's files to uint8 batches.

- ``listing`` (folders) / ``manifest`` (CSV, JSONL; ``multilabel``: label sets, 0/1 columns, the iterative
  stratified split): the user's layout -> per-split files + labels + a fingerprint; ``prepare``: download /
  write shards once or reuse them / read metadata (main process);
- ``shard_writer``: listing -> WebDataset shards (``staging``: written aside, renamed into place),
  ``meta``: ``dataset.json`` (its only reader and writer);
- ``sources``: shard specs -> shard lists, ``stream`` / ``loader``: rank- and worker-split streams;
- ``decode``: bytes -> RGB uint8, ``transforms``: crops, flips (the model normalises);
- ``survey``: the configured data before anything is written (classes, split sizes, image sizes, shards to
  write), read by the planner and the dry run;
- ``image_source``: the images ``finetune predict`` reads (folder, file, CSV list, shards) with their true labels
  or label sets, decoded in loader workers;
- ``split_source``: one split of any source (shards, manifest, image folder) -> its shards, written once and
  reused while the source is unchanged (``finetune-evaluate``'s ``--data``);
- ``seeds``: ``seed_int``, a stable integer seed from a string (augmentation and eval streams, the feature cache).

May import ``trainer.config``, ``trainer.files`` and ``trainer.distributed.wait`` (the main process writes
while the other ranks wait).

May import: trainer.config, trainer.files, trainer.distributed.wait.
"""
