"""Time limits for the requests of many tasks, with one timer.

`asyncio.timeout` makes an object, a timer and a lookup of the current task
for every request: about a tenth of a short flow's CPU (a WebAssembly echo).
The engine's workers each run one request at a time under the same limit,
`task_timeout_ms`; `Deadlines` keeps when each worker's request is due and one
timer, set for the earliest of them. When it fires, every worker whose time is
up is cancelled (the cancellation is taken back and turned into a timeout by
the request's own code, as `asyncio.timeout` does: `expired`), and the timer
is set again for the next one due. Starting and ending a request costs a
dictionary store and a comparison. `DueTimes`, the one timer for many things
due, serves the node's HTTP client too (a timer for each answer it waits for).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

EARLY_S = 0.001  # a timer may fire this much before its time (uvloop counts in milliseconds)
K = TypeVar("K", bound=Hashable)


class DueTimes(Generic[K]):
    """When each of many things is due (loop time), with one timer, set for the
    earliest. When it fires, `on_due(thing)` is called on the loop for every
    thing whose time has come, and the timer is set again for the next one due.
    A thing stays until `remove`d: `on_due` may be called for it again at a
    later firing, so it must do nothing the second time. Adding and removing
    cost a dictionary store and a comparison (a timer of uvloop's, made and
    cancelled, costs 1.6 µs here)."""

    def __init__(self, on_due: Callable[[K], None]) -> None:
        self._due: dict[K, float] = {}
        self._on_due = on_due
        self._timer: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the timer fires

    def add(self, thing: K, loop: asyncio.AbstractEventLoop, due: float) -> None:
        self._due[thing] = due
        if due < self._at:
            self._arm(loop, due)

    def when(self, thing: K) -> float:
        return self._due[thing]

    def remove(self, thing: K) -> None:
        self._due.pop(thing, None)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = when
        self._timer = loop.call_at(when, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._at = None, math.inf
        now, upcoming = loop.time() + EARLY_S, math.inf
        for thing, due in list(self._due.items()):
            if due > now:
                upcoming = min(upcoming, due)
            else:
                self._on_due(thing)
        if upcoming < math.inf:
            self._arm(loop, upcoming)


class Deadlines:
    def __init__(self) -> None:
        self._times: DueTimes[asyncio.Task] = DueTimes(self._time_up)
        self._cancelled: dict[asyncio.Task, int] = {}  # tasks cancelled for their time -> their cancel count before

    def start(self, task: asyncio.Task, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """`task`'s request is due in `seconds` (on `loop`, the task's)."""
        self._times.add(task, loop, loop.time() + seconds)

    def due(self, task: asyncio.Task) -> float:
        """When `task`'s request is due (loop time)."""
        return self._times.when(task)

    def expired(self, task: asyncio.Task) -> bool:
        """Called in `task` on a CancelledError: True when the cancellation was
        this deadline's alone (it is then taken back: raise a timeout instead);
        False when it came from elsewhere too (a stop: let it through)."""
        before = self._cancelled.pop(task, None)
        return before is not None and task.uncancel() <= before

    def end(self, task: asyncio.Task) -> None:
        """`task`'s request is over. A cancellation for its time that the request
        swallowed is taken back, so the task's next request starts clean."""
        self._times.remove(task)
        if self._cancelled.pop(task, None) is not None:
            task.uncancel()

    def _time_up(self, task: asyncio.Task) -> None:
        if task not in self._cancelled and not task.done():
            self._cancelled[task] = task.cancelling()
            task.cancel()
