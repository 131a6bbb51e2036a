"""Ctrl-C held back while the engine's state changes.

A step program consumes the donated KV cache and returns the new one; a KeyboardInterrupt
raised between the two (Python delivers it at any bytecode) left the engine holding a deleted
buffer for good. Inside `deferred_interrupts()` a SIGINT is recorded instead, and delivered
(the previous handler called) when the block ends, once the state is whole again.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT back for the duration of the block. Python runs signal handlers only in the
    main thread, so elsewhere (and where SIGINT is ignored or left to the OS) there is nothing
    to hold back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            previous(signal.SIGINT, caught[0])
