"""A clean stop on Ctrl-C or SIGTERM: the first signal asks the training loop to stop after the
current step; a second one aborts at once (``KeyboardInterrupt``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

INTERRUPTED = "interrupted"  # the stop reasons these signals give start with it: "interrupted (SIGINT)"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def is_interrupt(reason: str | None) -> bool:
    return reason is not None and reason.startswith(f"{INTERRUPTED} (")


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, SIGINT or SIGTERM calls ``request_stop("interrupted (SIGINT)")``
    once; any further one raises ``KeyboardInterrupt`` where the program is. The previous
    handlers are put back afterwards. Outside the main thread (where Python cannot handle
    signals) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handle(signum, frame):
        if received:
            raise KeyboardInterrupt(f"a second signal ({signal.Signals(signum).name}): training aborted")
        received.append(signum)
        request_stop(f"{INTERRUPTED} ({signal.Signals(signum).name})")

    previous = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, handle)
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler installed outside Python; the default is the closest we can restore.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
