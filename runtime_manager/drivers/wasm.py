"""The WebAssembly step driver: the node's compiled components and the threads
that run them. A call gets a fresh sandboxed instance (`wasm.sandbox`); its
outcome becomes the step's result or a named failure.

Short calls run on the event loop itself. Handing a call of 0.3 ms to a thread
and back costs more than the call (measured: about 450 µs of CPU per step, the
GIL changing hands and the wake-ups). A call tried on the loop gets one to two
epoch ticks (5–10 ms) instead of its time limit; when it is not done by then it
is stopped and run again, from the start, on a WebAssembly thread with its full
limit. Its component's calls go to the threads meanwhile; they come back to the
loop when that run was quick after all (the call had missed its budget waiting
for the GIL or for a garbage collection), and stay on the threads for
SLOW_FOR_S seconds otherwise (so do those of a component whose calls take over
INLINE_MAX_S of CPU on a moving average). Running a flow step twice changes nothing a caller can see: its module has no files, no
network and no state that outlives the call, only stdin and stdout in memory.
A runaway module thus holds the loop for at most 10 ms every SLOW_FOR_S.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable

from ..config import Component, Config, WasmComponent, WasmLimits
from ..core.errors import ComponentError, ResultTooLarge, Timeout, WasmTrap
from ..core.events import WASM_RUN, Events
from ..core.flows import Call
from ..core.lifecycle import Service
from ..wasm.modules import EPOCH_CLOCK
from ..wasm.pool import WasmPool
from ..wasm.sandbox import LoadedModule, RunOutcome, load, run_module
from .response import OutputProblem, decode_response

log = logging.getLogger("wasm")
INLINE_TICKS = 2  # epoch ticks (5 ms each) a call tried on the loop may take
INLINE_MAX_S = 0.002  # a component whose calls take longer runs on the threads
SLOW_FOR_S = 10.0


class WasmSteps(Service):
    """A service of the node (core/lifecycle.py), a dependency of the engine:
    `setup` compiles (or loads from the cache) every WASM component, `start`
    runs the epoch clock, `reconfigure` loads what a reload changed, `stop`
    ends the threads. WASM_RUN goes on `events` for every call."""

    name = "wasm"

    def __init__(self, components: Iterable[Component], events: Events, threads: int = 2,
                 max_threads: int = 16) -> None:
        self.components = [c for c in components if isinstance(c, WasmComponent)]
        self.threads, self.max_threads = threads, max_threads
        self.modules: dict[str, LoadedModule] = {}
        self._stamps: dict[str, tuple[object, ...]] = {}  # what each loaded module was loaded from
        self.pool: WasmPool | None = None
        # at most `limits.concurrency` calls of one component at once: a component
        # stuck in long calls holds a few threads, never all of them
        self._turns: dict[str, asyncio.Semaphore] = {}
        self._clock = False
        self.events = events
        self.reloaded: list[str] = []  # the components the last reload loaded again
        self._threads_until: dict[str, float] = {}  # component -> until when its calls go to the threads
        self._typical_s: dict[str, float] = {}  # component -> moving average of its calls on the loop
        self.inline_calls = self.thread_calls = self.inline_retries = 0

    async def setup(self) -> None:
        for comp in self.components:
            self._load(comp)

    def _load(self, comp: WasmComponent) -> LoadedModule:
        started = time.perf_counter()
        loaded = load(comp.module, fuel=comp.limits.fuel is not None, memory_stdio=True)
        self._stamps[comp.name] = _stamp(comp)
        self.modules[comp.name] = loaded
        log.info("loaded %s for component %s in %.1f ms", comp.module.name, comp.name, (time.perf_counter() - started) * 1000)
        return loaded

    async def reconfigure(self, config: Config) -> None:
        """A reload: see `update`; `reloaded` names what was loaded again."""
        self.reloaded = await self.update(config.components.values())

    async def update(self, components: Iterable[Component]) -> list[str]:
        """A reload: load the WebAssembly components that are new or whose module
        (file, its contents, fuel metering) changed; keep the others loaded.
        Returns the names loaded. Raises when a module does not load (nothing changed then)."""
        wanted = [c for c in components if isinstance(c, WasmComponent)]
        changed = [c for c in wanted if self._stamps.get(c.name) != _stamp(c)]
        loaded = {}
        for comp in changed:  # compiling may take a while: off the loop
            loaded[comp.name] = await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(load, comp.module, fuel=comp.limits.fuel is not None, memory_stdio=True))
        for comp in changed:
            self.modules[comp.name], self._stamps[comp.name] = loaded[comp.name], _stamp(comp)
            log.info("reload: loaded %s for component %s", comp.module.name, comp.name)
        for comp in wanted:
            old = next((c for c in self.components if c.name == comp.name), None)
            if old is None or old.limits.concurrency != comp.limits.concurrency:
                self._turns[comp.name] = asyncio.Semaphore(comp.limits.concurrency)
        self.components = wanted
        return [c.name for c in changed]

    async def start(self) -> None:
        EPOCH_CLOCK.start()
        self._clock = True
        self.pool = WasmPool(self.threads, self.max_threads)
        self._turns = {c.name: asyncio.Semaphore(c.limits.concurrency) for c in self.components}

    async def stop(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        if self._clock:
            EPOCH_CLOCK.stop()
            self._clock = False

    async def call(self, comp: WasmComponent, call: Call, body: bytes) -> object:
        assert self.pool is not None, "WasmSteps not started"
        loaded = self.modules[comp.name]  # taken when the step starts: a reload changes later steps only
        function = comp.endpoints[call.endpoint]
        async with self._turns[comp.name]:
            outcome, stopped = self._run_here(comp, loaded, function, body)
            if outcome is None:
                self.thread_calls += 1
                outcome, took = await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(
                    _timed_run, loaded, function, body, comp.limits, [comp.name], comp.max_output_bytes))
                if stopped and took <= INLINE_MAX_S and outcome.trap is None:
                    # stopped on the loop for want of time, not for computing: its calls may come back
                    self._threads_until.pop(comp.name, None)
        kind = _run_kind(outcome)
        try:
            return _step_result(comp, call, function, outcome)
        except (ResultTooLarge, ComponentError) as exc:  # a run that ended well with output that is not a result
            if kind == "ok":
                kind = "too_large" if isinstance(exc, ResultTooLarge) else "bad_output"
            raise
        finally:
            self.events.emit(WASM_RUN, comp.name, kind)

    def _run_here(self, comp: WasmComponent, loaded: LoadedModule, function: str,
                 body: bytes) -> tuple[RunOutcome | None, bool]:
        """Run the call here, on the loop, when its component's calls are short.
        (None, stopped): run it on a thread; `stopped`: it was tried here and ran
        out of the loop's budget."""
        if self._threads_until.get(comp.name, 0.0) > time.monotonic() or comp.limits.timeout_ms <= INLINE_TICKS * 5:
            return None, False
        cpu = time.thread_time()  # the call's own CPU: waiting for the GIL is not the module's doing
        outcome = run_module(loaded, function, body, comp.limits, [comp.name], deadline_ticks=INLINE_TICKS,
                             max_output=comp.max_output_bytes)
        took = time.thread_time() - cpu
        # a moving average, so one slow call (a cold cache, say) does not count
        typical = self._typical_s[comp.name] = 0.9 * self._typical_s.get(comp.name, 0.0) + 0.1 * took
        if typical > INLINE_MAX_S:
            self._threads_until[comp.name] = time.monotonic() + SLOW_FOR_S
            self._typical_s[comp.name] = 0.0
            log.debug("component %s: its calls take %.1f ms of CPU on the loop; they go to threads for %.0f s",
                      comp.name, typical * 1000, SLOW_FOR_S)
        if outcome.trap == "timeout":  # not done within the loop's budget: again, on a thread
            # Its component's calls go to the threads until that run shows whether the
            # module is slow (a garbage collection or another thread holding the GIL
            # can make a short call miss its budget too): back when it was quick.
            self.inline_retries += 1
            self._threads_until[comp.name] = time.monotonic() + SLOW_FOR_S
            return None, True
        self.inline_calls += 1
        return outcome, False


def _timed_run(loaded: LoadedModule, function: str, body: bytes, limits: WasmLimits, argv: list[str],
               max_output: int) -> tuple[RunOutcome, float]:
    """A run on a WebAssembly thread, and the CPU time it spent there."""
    cpu = time.thread_time()
    outcome = run_module(loaded, function, body, limits, argv, max_output=max_output)
    return outcome, time.thread_time() - cpu


def _step_result(comp: WasmComponent, call: Call, function: str, outcome: RunOutcome) -> object:
    """A finished run as the step's result, or the failure it is."""
    where = f"step {call.number} ({comp.name} endpoint {call.endpoint}, {function})"
    failure = dict(step=call.number, component=comp.name, endpoint=call.endpoint)
    if outcome.output_overflow:
        raise ResultTooLarge(f"{where}: output larger than max_output_bytes ({comp.max_output_bytes})", **failure)
    stderr = outcome.stderr.decode("utf-8", "replace").strip()[:200]
    detail = f"; stderr: {stderr}" if stderr else ""
    if outcome.trap == "timeout":
        raise Timeout(f"{where}: stopped after {comp.limits.timeout_ms} ms (limits.timeout_ms){detail}", **failure)
    if outcome.trap == "out_of_fuel":
        raise WasmTrap(f"{where}: out of fuel ({comp.limits.fuel}, limits.fuel){detail}", **failure)
    if outcome.trap is not None:
        if outcome.trap.startswith("out_of_memory"):
            raise WasmTrap(f"{where}: out of memory (limits.memory_mb {comp.limits.memory_mb}): {outcome.trap}", **failure)
        raise WasmTrap(f"{where}: trap: {outcome.trap}{detail}", **failure)
    if outcome.exit_code not in (None, 0):
        raise WasmTrap(f"{where}: exited with code {outcome.exit_code}{detail}", **failure)
    try:
        return decode_response(outcome.stdout, comp.max_output_bytes)
    except OutputProblem as exc:
        raise (ResultTooLarge if exc.too_large else ComponentError)(f"{where}: {exc}", **failure) from None


def _stamp(comp: WasmComponent) -> tuple[object, ...]:
    """What a loaded module depends on: its file (path, size, modification time) and fuel metering."""
    try:
        st = comp.module.stat()
        return comp.module, st.st_size, st.st_mtime_ns, comp.limits.fuel is not None
    except OSError:
        return comp.module, None, None, comp.limits.fuel is not None


def _run_kind(outcome: RunOutcome) -> str:
    """How a run ended, as `rm_wasm_runs_total` counts it."""
    if outcome.output_overflow:
        return "too_large"
    if outcome.trap is None:
        return "exit_code" if outcome.exit_code not in (None, 0) else "ok"
    if outcome.trap in ("timeout", "out_of_fuel"):
        return outcome.trap
    return "out_of_memory" if outcome.trap.startswith("out_of_memory") else "trap"
