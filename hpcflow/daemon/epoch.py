"""A daemon run's epoch: a number that grows with every run of one data dir.

Peers tell a restart from a late message of the previous run by its epoch
(larger is newer, see :mod:`hpcflow.catalog.replicated`), so it must grow even
when the clock does not: a node restarted with its clock behind its previous
start would otherwise be ignored by its peers for good.  The last epoch is kept
in ``<data_dir>/epoch`` and the next one is ``max(time_ns(), last + 1)``,
written atomically (temp file, fsync, rename, fsync of the directory) before
the run announces it.  The data dir is locked by the caller, so no two runs
race for it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import ConfigError

EPOCH_FILE = "epoch"
#: Epochs travel as msgpack ints (unsigned 64 bits).
MAX_EPOCH = (1 << 63) - 1


def next_epoch(data_dir: Path) -> int:
    """This run's epoch, larger than every earlier run's of ``data_dir``, and persisted."""
    path = Path(data_dir) / EPOCH_FILE
    last = 0
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if text:
        if not text.isdigit() or not 0 < int(text) < MAX_EPOCH:
            raise ConfigError(f"{path} should hold the last run's epoch (a positive integer), "
                              f"not {text[:40]!r}; if no other run of this node is newer, "
                              "remove the file")
        last = int(text)
    epoch = max(time.time_ns(), last + 1)
    tmp = path.with_name(f".{EPOCH_FILE}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, f"{epoch}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise ConfigError(f"cannot record this run's epoch in {path}: {exc}") from exc
    return epoch


__all__ = ["EPOCH_FILE", "next_epoch"]
