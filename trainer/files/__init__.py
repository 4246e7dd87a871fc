"""Files written so that a crash never leaves half of one, and locks between processes and hosts.

- ``atomic``: the one atomic file writer (temp file + fsync + rename), hard links with the same guarantee,
  clean-up of dead writers' temp files, ``sha256_file``;
- ``lock``: an exclusive lock file between processes and hosts (host, pid, heartbeat; stale locks
  of dead processes are taken over).

Imports only the standard library; every other subpackage may import it.

May import: nothing.
"""
