"""The event loop's own pulse (a service of the node)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..cluster.worker_loads import WorkerLoads
from ..core.lifecycle import Service
from ..engine import FlowEngine

log = logging.getLogger("node")


class LoopWatch(Service):
    """The event loop's own pulse, every TICK_S: how late each tick comes (a lag
    over LAG_WARN_S is logged), when the loop last ran (readiness says "wedged"
    when that is long ago: REST threads answer even then), and under `serve
    --processes` the worker's heartbeat and load for the supervisor and the
    first worker (`worker_loads.py`)."""

    name = "loop watch"
    TICK_S = 0.5
    LAG_WARN_S = 1.0
    SIBLING_SILENT_S = 10.0  # a sibling worker without a beat this long: the supervisor could not bring it back

    def __init__(self, engine: FlowEngine, loads: WorkerLoads | None,
                 sibling_silent: Callable[[int], None] | None = None) -> None:
        self.engine, self.loads = engine, loads
        self.sibling_silent = sibling_silent  # told which sibling worker is silent (on the loop)
        self.last_tick = time.monotonic()
        self.lag_s = 0.0  # the last tick's
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.last_tick = time.monotonic()
        if self.loads is not None:  # the first heartbeat: the supervisor counts silence from here
            self.loads.write(self.engine.active, self.engine.pending() - self.engine.active)
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-watch")

    async def stop(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.TICK_S)
            now = time.monotonic()
            self.lag_s = max(0.0, now - self.last_tick - self.TICK_S)
            self.last_tick = now
            if self.lag_s > self.LAG_WARN_S:
                log.warning("the event loop was held for %.1f s (a step that blocks it, or the process was stopped)",
                            self.lag_s)
            if self.loads is not None:
                self.loads.write(self.engine.active, self.engine.pending() - self.engine.active)
                if self.sibling_silent is not None:
                    for k in self.silent_siblings(now):
                        self.sibling_silent(k)

    def silent_siblings(self, now: float) -> list[int]:
        """Sibling workers that have beaten once and not for SIBLING_SILENT_S."""
        assert self.loads is not None
        return [k for k, at in enumerate(self.loads.beats())
                if k != self.loads.index and at and now - at > self.SIBLING_SILENT_S]

    def silent_s(self) -> float:
        """How long since the loop last ran (any thread)."""
        return time.monotonic() - self.last_tick
