"""Graceful stops: SIGINT (Ctrl-C), SIGTERM (``timeout``, a cluster's pre-emption) and SIGHUP (the
terminal closed) end a run with a checkpoint and a non-zero exit instead of a lost run or a silent
exit 0.

While the solver trains, the first signal only sets :data:`requested`; the solver stops at its next
iteration, :class:`~ldsc.runtime.callbacks.SolverCheckpoint` saves ``last.ckpt`` and raises
:class:`RunInterrupted`, and the entry point prints one sentence (how to resume) and exits with
``128 + signal number``. A second Ctrl-C stops at once (one sentence too, no traceback). Before
training has started there is no state worth saving, so a signal stops the run immediately.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from ldsc.errors import LdscError

#: name of the signal received during this run ("SIGINT" / "SIGTERM"), or None
requested: str | None = None
#: whether the solver is training (set by SolverCheckpoint): a signal then waits for a checkpoint
training: bool = False
#: on several processes: passes a signal on to the processes this one launched (see take_over_sigterm)
_forward = None


class RunInterrupted(LdscError):
    """The run was stopped by a signal (its message says whether and where a checkpoint was saved)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def _handler(signum, frame) -> None:
    global requested, _forward
    name = signal.Signals(signum).name
    if _forward is not None:
        forward, _forward = _forward, None
        forward(signum)
    if requested is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
        raise RunInterrupted("Stopped at once by a second SIGINT (Ctrl-C); the last checkpoint saved, if any, is in "
                             "the run's checkpoints/ folder (continue with the same command plus `resume=true`).", signum)
    requested = name
    if not training:
        raise RunInterrupted(f"Stopped by {name} before the solver started; nothing to resume from "
                             f"(a finished feature store is kept and reused).", signum)


def take_over_sigterm(forward=None) -> None:
    """On several processes: handle SIGTERM here rather than in Lightning, whose handler runs a
    collective (a broadcast) inside the signal handler, which can interleave with the solver's own
    collectives and hang every process. This handler only sets :data:`requested` (the processes
    agree on it at the solver's next iteration, :meth:`~ldsc.solvers.lobpcg.LobpcgSolver.stop_requested`)
    and passes the signal once to the processes this one launched (``forward(signum)``)."""
    global _forward
    _forward = forward
    signal.signal(signal.SIGTERM, _handler)


#: the signals that stop a run gracefully
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def hold_signals() -> None:
    """Hold (block) the stop signals from the start of an entry point until :func:`graceful_signals`
    installs the run's handlers. A Ctrl-C that lands while Python imports torch or numpy interrupts
    the import half-way; the retried import then fails ("cannot load module more than once") and
    the run ends in a traceback, or the interpreter ends killed by the signal. Held, the signal
    waits (a few seconds at most) and is handled by the run's own handler: one sentence, exit
    ``128 + signal number``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def release_signals() -> None:
    """Deliver any held stop signal now (with whatever handler is installed) and stop holding."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


@contextmanager
def graceful_signals():
    """Install the handlers for the duration of a run (previous handlers and the signal mask
    restored after); a signal held since the entry point started (:func:`hold_signals`) is
    delivered to them at once."""
    global requested, training, _forward
    requested, training, _forward = None, False, None
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in previous:
        signal.signal(s, _handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, h in previous.items():
            signal.signal(s, h)
        training, _forward = False, None


def signal_number(name: str) -> int:
    return int(getattr(signal, name))
