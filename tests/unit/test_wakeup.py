"""`Wakeup`: a wake-up or a stop reaches every thread of a loop, idle or mid-round, on 600 s polls."""

from __future__ import annotations

import threading
from collections.abc import Callable

from plugin.wakeup import Wakeup

POLL_S = 600  # no thread may wait this out within a test's deadline
DEADLINE_S = 20


def start(wakeup: Wakeup, round_: Callable[[], bool]) -> threading.Thread:
    thread = threading.Thread(target=wakeup.loop, args=(POLL_S, round_), daemon=True)
    thread.start()
    return thread


def stop_all(wakeup: Wakeup, threads: list[threading.Thread]) -> None:
    """`stop`, then every thread must end within the deadline (not wait out its poll)."""
    wakeup.stop()
    for thread in threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()


class Rounds:
    """An idle round (returns False) that counts itself; the first one can be held mid-round."""

    def __init__(self, hold_first: bool = False) -> None:
        self.count = 0
        self.counted = threading.Condition()
        self.in_first = threading.Event()
        self.release_first = threading.Event()
        if not hold_first:
            self.release_first.set()

    def __call__(self) -> bool:
        self.in_first.set()
        assert self.release_first.wait(DEADLINE_S), "the held round was never released"
        with self.counted:
            self.count += 1
            self.counted.notify_all()
        return False

    def wait_for(self, count: int) -> None:
        with self.counted:
            assert self.counted.wait_for(lambda: self.count >= count, DEADLINE_S), (
                f"{self.count} rounds, expected {count}"
            )


def test_a_wake_starts_a_round_in_every_idle_thread() -> None:
    wakeup = Wakeup()
    first, second = Rounds(), Rounds()
    threads = [start(wakeup, first), start(wakeup, second)]
    first.wait_for(1)
    second.wait_for(1)
    wakeup.wake()
    first.wait_for(2)
    second.wait_for(2)
    stop_all(wakeup, threads)


def test_a_thread_mid_round_goes_round_again_after_a_wake_another_thread_saw_first() -> None:
    wakeup = Wakeup()
    idle, held = Rounds(), Rounds(hold_first=True)
    threads = [start(wakeup, idle), start(wakeup, held)]
    idle.wait_for(1)
    assert held.in_first.wait(DEADLINE_S)
    wakeup.wake()
    idle.wait_for(2)  # the idle thread took the wake-up first...
    held.release_first.set()
    held.wait_for(2)  # ...and the held thread still goes round again instead of waiting its poll
    stop_all(wakeup, threads)


def test_a_thread_mid_round_when_stop_comes_ends_after_that_round() -> None:
    wakeup = Wakeup()
    idle, held = Rounds(), Rounds(hold_first=True)
    idle_thread, held_thread = start(wakeup, idle), start(wakeup, held)
    idle.wait_for(1)
    assert held.in_first.wait(DEADLINE_S)
    wakeup.stop()
    idle_thread.join(DEADLINE_S)
    assert not idle_thread.is_alive()
    held.release_first.set()
    held_thread.join(DEADLINE_S)
    assert not held_thread.is_alive(), "the held thread waited out its poll after stop"
    assert held.count == 1


def test_a_busy_loop_goes_round_without_waiting_until_it_is_idle() -> None:
    wakeup = Wakeup()
    busy = iter([True, True, False])
    rounds: list[bool] = []

    def round_() -> bool:
        rounds.append(next(busy, False))
        if len(rounds) == 3:
            wakeup.stop()
        return rounds[-1]

    thread = start(wakeup, round_)
    thread.join(DEADLINE_S)
    assert not thread.is_alive() and rounds == [True, True, False]
