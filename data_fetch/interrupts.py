"""SIGTERM met as Ctrl-C by the command-line tools: data_fetch's own and mtlearn's (train, course, experiments),
which import these from here (mtlearn.utils), so that both say what they kept and how to go on."""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler pre-empting the job, a Colab runtime stopped, `kill`) in a command-line tool, handled
    as Ctrl-C is: the process ended without a word, where what is kept and how to go on are wanted most. A
    KeyboardInterrupt, so that DataLoader workers forked with the handler leave quietly too (spawned ones, on
    macOS and Windows, end as SIGTERM ends a process)."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """For the duration, SIGTERM raises Terminated in the main thread (elsewhere, a thread, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        yield
        return

    def terminated(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back (nor could it run)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def stop_status(stop: KeyboardInterrupt) -> tuple[str, int]:
    """What a command-line tool says it was, and its exit status: Ctrl-C 130, SIGTERM 143 (128 + the signal)."""
    return ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
