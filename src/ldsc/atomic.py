"""Safe outputs: atomic file writes (a temporary file next to the target, renamed over it: a
reader never sees a half-written file, and a failed write leaves the previous file untouched) and
a lock that keeps two runs out of one output folder.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path`` (same folder, so
    the rename is atomic); the temporary file is removed if ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextmanager
def folder_lock(folder: str | Path):
    """Hold ``<folder>/.ldsc.lock`` (an exclusive ``flock``) for the duration of a run; a second run
    in the same folder is refused with one sentence. The lock file is removed when the run ends;
    the ``flock`` itself dies with its process, so a lock file left by a killed run is taken over
    (with a line naming the process that left it)."""
    import fcntl
    import logging

    from ldsc.errors import ConfigError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".ldsc.lock"
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise ConfigError(f"The output folder '{folder}' is in use by another run ({owner}): wait for it to end "
                              f"or choose another hydra.run.dir.") from None
        try:  # the file we locked may have been removed by the run that just released it: lock the new one
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    fh.seek(0)
    left = fh.read().strip()
    if left:
        logging.getLogger("ldsc").info("taking over the lock of '%s' left by a run that is no longer running (%s)",
                                       folder, left)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    try:
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
