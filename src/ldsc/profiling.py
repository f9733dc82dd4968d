"""Wall time and peak memory of the stages of a run (features, search, symmetrise, solve, ...).

``with stage("search", record): ...`` adds ``{"seconds", "peak_rss_mb"}`` under ``record["search"]``.
On Linux the process's peak resident memory (``VmHWM``) is reset at the start of each stage by
writing ``5`` to ``/proc/self/clear_refs``, so each stage reports its own peak; elsewhere the
peak is the process's peak so far.
"""

from __future__ import annotations

import time
from contextlib import contextmanager


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """The peak resident memory since the last :func:`reset_peak` (MB), if the OS tells."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


@contextmanager
def stage(name: str, record: dict):
    reset_peak()
    t = time.perf_counter()
    try:
        yield
    finally:
        entry = record.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0})
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - t, 3)
        entry["peak_rss_mb"] = round(max(entry["peak_rss_mb"], peak_rss_mb() or 0.0), 1)


def numpy_hugepages(enabled: bool | None) -> None:
    """Whether NumPy asks the kernel to back its large arrays (≥ 4 MB) with huge pages (``None``:
    NumPy's default, on). Where the kernel compacts memory synchronously for such a request
    (``/sys/kernel/mm/transparent_hugepage/defrag`` = ``madvise``, a common default) the first
    touch of a 500 MB array took 0.05–0.96 s instead of a steady 0.17–0.18 s without the advice
    on our machines. Set before NumPy is imported it is ``NUMPY_MADVISE_HUGEPAGE``; after, NumPy's
    own switch."""
    import os
    import sys

    if enabled is None:
        return
    if "numpy" not in sys.modules:
        os.environ["NUMPY_MADVISE_HUGEPAGE"] = "1" if enabled else "0"
        return
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)
    switch = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if switch is not None:
        switch(bool(enabled))


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Many mid-sized temporary tensors (the clustered search allocates a few per leaf) leave the
    heap fragmented: freed, but still resident. On 10⁷ tokens that was ~3 GB of resident memory
    carried from the search into the symmetrisation, the graph stage's peak."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass
