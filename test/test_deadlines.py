"""`DueTimes`, the one timer behind the engine's request deadlines and the HTTP
client's answer timeouts, against any sequence of things added and removed:
each thing still there when its time comes is told, none before its time,
none after it was removed, and one timer at most is ever pending. The loop is
a stand-in with a clock the test moves (asyncio's loop is not the product's)."""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime_manager.core.deadlines import EARLY_S, DueTimes


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SteppedLoop:
    """`time()` and `call_at()` as a loop offers them, on a clock moved by `run_until`."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, Handle, Any, tuple]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, fn: Any, *args: Any) -> Handle:
        handle = Handle()
        heapq.heappush(self._timers, (when, next(self._order), handle, fn, args))
        return handle

    def pending(self) -> int:
        return sum(not h.cancelled for _w, _o, h, _f, _a in self._timers)

    def run_until(self, t: float) -> None:
        while self._timers and self._timers[0][0] <= t:
            when, _o, handle, fn, args = heapq.heappop(self._timers)
            if not handle.cancelled:
                self.now = max(self.now, when)
                fn(*args)
        self.now = max(self.now, t)


steps = st.lists(st.tuples(st.sampled_from(["add", "remove", "wait"]), st.integers(0, 7),
                           st.floats(0.0, 5.0, allow_nan=False)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(steps)
def test_each_thing_is_told_when_its_time_comes_and_not_before_nor_after_its_removal(plan):
    loop = SteppedLoop()
    told: list[tuple[int, float]] = []
    due: dict[int, float] = {}  # what the test believes is registered
    removed_at: dict[int, float] = {}

    def on_due(thing: int) -> None:
        assert thing in due, f"{thing} told after it was removed"
        assert loop.now >= due[thing] - EARLY_S, f"{thing} told at {loop.now}, due at {due[thing]}"
        told.append((thing, loop.now))

    times: DueTimes[int] = DueTimes(on_due)
    for action, thing, amount in plan:
        if action == "add":
            due[thing] = loop.now + amount
            removed_at.pop(thing, None)
            times.add(thing, loop, due[thing])  # type: ignore[arg-type]
        elif action == "remove":
            if due.pop(thing, None) is not None:
                removed_at[thing] = loop.now
            times.remove(thing)
        else:
            loop.run_until(loop.now + amount)
        assert loop.pending() <= 1
        # everything registered and due by now has been told, at or after its time
        for t, d in due.items():
            if d <= loop.now - EARLY_S:
                assert any(x == t and at >= d - EARLY_S for x, at in told), (t, d, loop.now, told)
    loop.run_until(loop.now + 10.0)
    for t, d in due.items():
        assert any(x == t and at >= d - EARLY_S for x, at in told)
    assert loop.pending() == 0
