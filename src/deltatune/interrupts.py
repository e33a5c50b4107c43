"""Ctrl-C that cannot be lost.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode of the main thread. When that bytecode
belongs to a `__del__` the garbage collector is running (a tokenizer's regex objects, for one), Python prints
"Exception ignored in ..." and carries on: the interrupt is gone, and a training run goes on to its end.
`install()` (called by the command line) keeps a note of every SIGINT beside raising as before, and the long
loops call `raise_if_requested()` between steps or batches (training, evaluation and prediction over a split,
the frozen reader's prompt training), so a swallowed Ctrl-C still stops them; the "Exception ignored" report
of such an interrupt is left out, so the user still reads one line.
"""

from __future__ import annotations

import signal
import sys

_requested = False


def _on_sigint(signum, frame) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt


def _quiet_noted_interrupts(unraisable, report) -> None:
    """sys.unraisablehook: a noted KeyboardInterrupt swallowed in a `__del__` is not reported (it is raised
    again by the next `raise_if_requested()`); everything else goes to the hook that was there before."""
    if not (_requested and isinstance(unraisable.exc_value, KeyboardInterrupt)):
        report(unraisable)


def install() -> None:
    """Note SIGINTs as well as raising them; a SIGINT a parent set to be ignored (nohup) stays ignored."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
        previous = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: _quiet_noted_interrupts(unraisable, previous)


def raise_if_requested() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived, even one swallowed inside a `__del__`."""
    if _requested:
        raise KeyboardInterrupt


def clear() -> None:
    """Forget a SIGINT already handled (for a process that goes on after one, e.g. a test)."""
    global _requested
    _requested = False


__all__ = ["install", "raise_if_requested", "clear"]
