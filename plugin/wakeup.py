"""Polling threads that a wake-up starts early and a stop ends at once (job slots, sending threads)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Wakeup:
    """Shared by the threads of one loop: `wake` reaches every thread, idle or mid-round, and `stop`
    ends them all after their current round.

    A wake-up is counted, not a flag a thread clears: a thread that is mid-round when `wake` or `stop`
    comes goes round again instead of waiting out its poll, whichever thread woke first.
    """

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._changed = threading.Condition()
        self._wakes = 0

    def wake(self) -> None:
        """Idle threads go round now; threads mid-round go round again at once."""
        with self._changed:
            self._wakes += 1
            self._changed.notify_all()

    def stop(self) -> None:
        """Every thread ends after its current round; `stopping` is set before any thread is woken."""
        self.stopping.set()
        self.wake()

    def loop(self, poll_s: float, round_: Callable[[], bool]) -> None:
        """Call ``round_`` until `stop`: at once again after a busy round (it returned True), else after
        ``poll_s`` or the next `wake`, whichever comes first. Exceptions from ``round_`` propagate."""
        while True:
            with self._changed:
                seen = self._wakes
            if self.stopping.is_set():
                return
            if not round_():
                self._idle(seen, poll_s)

    def _idle(self, seen: int, timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._wakes != seen, timeout)
