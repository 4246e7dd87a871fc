"""Data, from the user's files to uint8 batches.

- ``prepare``: download / write shards once / read metadata (main process), ``shard_writer``: image
  files -> WebDataset shards, ``meta``: ``dataset.json``;
- ``sources``: shard specs -> shard lists, ``stream`` / ``loader``: rank- and worker-split streams;
- ``decode``: bytes -> RGB uint8, ``transforms``: crops, flips (the model normalises).

May import ``trainer.config`` and ``trainer.utils``.
"""
