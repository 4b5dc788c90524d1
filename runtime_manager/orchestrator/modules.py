"""Running one orchestrator module: a thread of its own, its own wasmtime engine
(so a delete or its time limit interrupts just this module), restarts on a trap
when asked, and one status at the end."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import WasmLimits
from ..wasm.channels import ModuleChannels
from ..wasm.modules import ModuleError, make_engine
from ..wasm.sandbox import MemoryProbe, load, run_module
from .control import ModuleSpec

log = logging.getLogger("orch")
MAX_RESTARTS = 5


@dataclass
class ModuleRun:
    spec: ModuleSpec
    object_id: str  # of the create, for the reply
    stop: threading.Event = field(default_factory=threading.Event)
    wakeup: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    timed_out: threading.Event = field(default_factory=threading.Event)  # args.limit ran out
    active: float = field(default_factory=time.time)
    thread_id: int | None = None
    memory: MemoryProbe = field(default_factory=MemoryProbe)  # its linear memory, live while it runs
    cpu_seen: float = 0.0  # the module thread's CPU seconds at the last keepalive
    cpu_seen_at: float = field(default_factory=time.monotonic)
    engine: Any = None  # its own wasmtime engine, once loaded
    channels: ModuleChannels | None = None  # what it may open (`channels` imports)

    def interrupt(self) -> None:
        """End the run in progress: its deadline is one epoch away."""
        engine = self.engine
        if engine is not None:
            engine.increment_epoch()
            engine.increment_epoch()

    @property
    def memory_bytes(self) -> int:
        return self.memory.size()

    @property
    def uuid(self) -> str:
        return self.spec.uuid

    @property
    def name(self) -> str:
        return self.spec.name

    def time_out(self) -> None:
        """args.limit ran out: end the run in progress, even one waiting on a channel."""
        self.timed_out.set()
        if self.channels is not None:
            self.channels.cancel()
        self.interrupt()

    def request_stop(self) -> None:
        """Effective whatever the limit or the repeat count: the flag stops the
        next run from starting, the interrupt ends the one running."""
        self.stop.set()
        self.wakeup.set()
        if self.channels is not None:
            self.channels.cancel()  # a read waiting for a message returns
        self.interrupt()


@dataclass
class ModuleEvents:
    """What a module's thread tells the runtime (each may be called from that thread)."""

    started: Callable[[ModuleRun], None]
    refused: Callable[[ModuleRun, str], None]
    output: Callable[[ModuleRun, bytes], None]
    ended: Callable[[ModuleRun, dict[str, Any]], None]


def module_thread(run: ModuleRun, events: ModuleEvents) -> None:
    """The body of a module's thread: load, run (repeat, restart), report the end.
    Never raises: anything unexpected ends the module with a `trap` status."""
    run.thread_id = threading.get_native_id()
    status: dict[str, Any] = {"code": -1, "reason": "trap", "message": "not started"}
    try:
        engine = make_engine(False)  # its own, so a delete can interrupt just this module
        try:
            channels = run.channels or ModuleChannels([], lambda _c, _p, gone: gone(), run.name)
            loaded = load(run.spec.path, engine=engine, channels=channels)
            run.engine = engine
        except ModuleError as exc:
            log.error("create of module %s refused: %s", run.name, exc)
            events.refused(run, f"cannot load {run.spec.path.name}: {exc}")
            return
        events.started(run)
        watcher = threading.Thread(target=_watch, args=(run, engine), name=f"watch-{run.name}", daemon=True)
        watcher.start()
        status = _run_repeatedly(run, loaded, events)
    except Exception as exc:
        log.exception("module %s failed unexpectedly", run.name)
        status = {"code": -1, "reason": "trap", "message": f"internal error: {type(exc).__name__}: {exc}"}
    finally:
        run.done.set()
        run.wakeup.set()
    events.ended(run, status)


def _run_repeatedly(run: ModuleRun, loaded: Any, events: ModuleEvents) -> dict[str, Any]:
    spec = run.spec

    def out(chunk: bytes) -> None:
        run.active = time.time()
        events.output(run, bytes(chunk))

    status: dict[str, Any] = {"code": 0, "reason": "exited", "message": "finished"}
    restarts, done_runs = 0, 0
    while done_runs < spec.repeat:
        if run.stop.is_set():
            return {"code": -1, "reason": "deleted", "message": "stopped by a delete"}
        if run.channels is not None:
            run.channels.begin_run()
        outcome = run_module(loaded, "_start", b"", WasmLimits(memory_mb=64), argv=[spec.name, *spec.argv], env=spec.env,
                             dirs=spec.dirs, stop=run.stop, stdout=out, deadline_ticks=1, memory=run.memory)
        stderr = outcome.stderr.decode("utf-8", "replace").strip()[:300]
        # however the run ended (a channel read answered ECANCELED and the module
        # exited, say), a delete or the time limit ended it
        if run.timed_out.is_set() or outcome.trap == "timeout":
            return {"code": -1, "reason": "timeout", "message": f"stopped after args.limit {spec.limit_s} s"}
        if run.stop.is_set() or outcome.trap == "deleted":
            return {"code": -1, "reason": "deleted", "message": "stopped by a delete"}
        if outcome.trap is not None:
            status = {"code": -1, "reason": "trap", "message": outcome.trap + (f"; stderr: {stderr}" if stderr else "")}
            if spec.fault_crash == "restart" and restarts < MAX_RESTARTS and not run.stop.is_set():
                restarts += 1
                log.warning("module %s trapped (%s); restart %d of %d", run.name, outcome.trap, restarts, MAX_RESTARTS)
                continue
            return status
        code = outcome.exit_code or 0
        status = {"code": code, "reason": "exited", "message": f"exit code {code}" + (f"; stderr: {stderr}" if stderr else "")}
        done_runs += 1
        if code != 0:
            break
    return status


def _watch(run: ModuleRun, engine: Any) -> None:
    """Interrupt the module when args.limit runs out (a delete interrupts it itself)."""
    try:
        run.wakeup.wait(run.spec.limit_s)
        if not run.done.is_set() and not run.stop.is_set():
            run.time_out()
    except Exception:
        log.exception("the time limit of module %s failed; stopping it", run.name)
        run.request_stop()
