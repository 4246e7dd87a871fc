"""Small shared helpers with no dependency on the rest of the trainer.

- ``files``: the one atomic file writer (temp file + fsync + rename), clean-up of dead writers'
  temp files, ``sha256_file``;
- ``file_lock``: an exclusive lock file between processes and hosts (host, pid, heartbeat; stale locks
  of dead processes are taken over);
- ``seeds``: ``seed_int``, a stable integer seed from a string.

Imports only the standard library; every other subpackage may import it.

May import: nothing.
"""
