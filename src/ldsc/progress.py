"""Progress that reads well in a terminal *and* in a log file.

In a terminal (stderr is a TTY) :func:`bar` is a ``tqdm`` bar that redraws itself in place. In a
file or a pipe (a cluster job's log, ``make demo > log.txt``) redrawing glues hundreds of
updates into one line, so :func:`bar` returns a :class:`LineProgress` instead: one plain log line
every ``LDSC_PROGRESS_INTERVAL`` seconds (default 30) while the work lasts, and one when it ends::

    [..][ldsc.progress][INFO] - features: 40/101 img (40%), 12 s, about 18 s left
    [..][ldsc.progress][INFO] - features: 101/101 img in 30.5 s

``LDSC_PROGRESS=tty`` or ``LDSC_PROGRESS=lines`` forces one kind; ``LDSC_PROGRESS=off`` hides both.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("ldsc.progress")


def mode() -> str:
    """``"tty"``, ``"lines"`` or ``"off"``: ``$LDSC_PROGRESS`` if set, else by whether stderr is a terminal."""
    forced = os.environ.get("LDSC_PROGRESS", "").strip().lower()
    if forced in ("tty", "lines", "off"):
        return forced
    try:
        return "tty" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return "lines"


def interval() -> float:
    """Seconds between two progress lines in a file (``$LDSC_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("LDSC_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


class LineProgress:
    """A progress counter that writes plain log lines (see module docstring); the subset of
    ``tqdm``'s interface that ldsc uses: ``update``, ``set_postfix_str``, ``close``, ``n``,
    ``total`` and use as a context manager or an iterable wrapper."""

    def __init__(self, iterable=None, total: float | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, every: float | None = None, **_):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.every = interval() if every is None else every
        self.n = 0
        self.postfix = ""
        self.start = self._last = time.perf_counter()
        self.closed = False

    def _count(self, n: float) -> str:
        fmt = (lambda x: f"{x:,.0f}") if self.n >= 10_000 or (self.total or 0) >= 10_000 else (lambda x: f"{x:g}")
        return f"{fmt(n)}/{fmt(self.total)}" if self.total else fmt(n)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.disable or now - self._last < self.every:
            return
        self._last = now
        spent = now - self.start
        text = f"{self.desc}: {self._count(self.n)} {self.unit}"
        if self.total:
            frac = self.n / self.total
            text += f" ({100 * frac:.0f}%), {_seconds(spent)}"
            if 0 < frac < 1:
                text += f", about {_seconds(spent * (1 - frac) / frac)} left"
        else:
            text += f", {_seconds(spent)}"
        log.info("%s%s", text, f" [{self.postfix}]" if self.postfix else "")

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.disable:
            return
        spent = time.perf_counter() - self.start
        log.info("%s: %s %s in %s%s", self.desc, self._count(self.n), self.unit, _seconds(spent),
                 f" [{self.postfix}]" if self.postfix else "")

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(iterable=None, total: float | None = None, desc: str = "", unit: str = "it", disable: bool = False,
        **kwargs):
    """A ``tqdm`` bar in a terminal, a :class:`LineProgress` otherwise (see module docstring)."""
    m = mode()
    if m == "tty":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable or m == "off")
