"""Running one orchestrator module: a thread of its own, its own wasmtime engine
(so a delete or its time limit interrupts just this module), restarts on a trap
when asked, and one status at the end.

A migratable module (`wasm/migratable.py`) runs as a `ResumableRun`: whoever
wants its state (a move, a periodic checkpoint) asks `ModuleRun.pause`, gets
the checkpoint from the module's thread at its next safe point, and then says
what happens: it goes on here, it moved (the thread ends), or it stops.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from ..config import WasmLimits
from ..wasm.channels import ModuleChannels
from ..wasm.checkpoint import Checkpoint, encode
from ..wasm.migratable import Migratable, prepare
from ..wasm.modules import ModuleError, compile_module, make_engine, module_bytes
from ..wasm.resumable import ResumableRun
from ..wasm.sandbox import MemoryProbe, RunOutcome, ended_how, load, run_module
from .control import ModuleSpec

log = logging.getLogger("orch")
MAX_RESTARTS = 5
GO_ON, MOVED, STOP = "go on", "moved", "stop"
BETWEEN_RUNS, PAUSING = "it is between runs", "it is already pausing"
TRANSIENT = (BETWEEN_RUNS, PAUSING)  # why a pause cannot be had now, but may in a moment


class Pause:
    """One pause asked of a running module. `checkpoint` resolves in the
    module's thread at its next safe point (or the asker cancels it); then the
    asker calls `decide` once: GO_ON, MOVED (with where to) or STOP."""

    def __init__(self, encoded: bool = False, base: bytes | None = None, base_sha256: str | None = None) -> None:
        self.checkpoint: concurrent.futures.Future[Checkpoint] = concurrent.futures.Future()
        self.paused_at = 0.0  # time.monotonic() when it stopped at the safe point
        self.encoded = encoded  # the module's thread encodes it too (a move: no thread hop in the pause)
        self.blob = b""  # ... into these bytes
        self.base, self.base_sha256 = base, base_sha256  # ... as the pages that differ from this memory
        self._verdict: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()

    def decide(self, verdict: str, message: str = "") -> None:
        self._verdict.put((verdict, message))

    def verdict(self) -> tuple[str, str]:
        return self._verdict.get()


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
    code: bytes | None = None  # its (migratable) bytes, when they came with a move: no file needed
    resume_from: Checkpoint | None = None  # go on from here instead of starting
    move_id: str | None = None  # the move it arrived by
    migratable: bool = True  # wanted (runtime.conf orchestrator.migratable, args.migratable)
    why_not_movable: str | None = "not started yet"  # None: it can move with its state
    prepared: Migratable | None = None
    current: ResumableRun | None = None  # the run in progress, when it can pause
    pause_asked: Pause | None = None
    moving: bool = False  # a move of it is under way
    arrived: bool = False  # it came by a move and goes on here
    silent: bool = False  # it ends without an `exited` (its mover took it back)
    moved_to: str | None = None  # the runtime it went on at, with its state
    restart_at: str | None = None  # the runtime it is started again at (a move without its state), and why
    memory_mb: int = 64  # its linear memory limit
    checkpoints: int = 0  # checkpoints of it kept on the broker from here
    last_checkpoint: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.monotonic)  # less what it ran elsewhere

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
        current = self.current
        if current is not None:
            current.wake()
        self.interrupt()

    def pause(self, encoded: bool = False, base: bytes | None = None, base_sha256: str | None = None) -> Pause | str:
        """Ask the module to stop at its next safe point (any thread). A Pause,
        or why it cannot be paused. `encoded`: the checkpoint's bytes come too."""
        current = self.current
        if self.why_not_movable is not None:
            return self.why_not_movable
        if current is None or self.pause_asked is not None or self.done.is_set():
            return BETWEEN_RUNS if not self.done.is_set() and current is None else \
                PAUSING if self.pause_asked is not None else "it has ended"
        asked = self.pause_asked = Pause(encoded, base, base_sha256)
        current.pause()
        return asked

    def give_up_pause(self, asked: Pause) -> bool:
        """The asker stops waiting; False when the checkpoint is on its way (wait for it)."""
        if not asked.checkpoint.cancel():
            return False
        current = self.current
        if current is not None:
            current.cancel_pause()
        if self.pause_asked is asked:
            self.pause_asked = None
        return True

    def memory_copy(self) -> bytes | None:
        """Its memory now, while it runs (any thread), or None."""
        current = self.current
        return current.memory_copy() if current is not None else None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at


@dataclass
class ModuleEvents:
    """What a module's thread tells the runtime (each may be called from that thread)."""

    started: Callable[[ModuleRun], None]
    refused: Callable[[ModuleRun, str], None]
    output: Callable[[ModuleRun, bytes], None]
    ended: Callable[[ModuleRun, dict[str, Any]], None]
    resumed: Callable[[ModuleRun, str | None], None]  # a moved module went on here (None), or why not


def module_thread(run: ModuleRun, events: ModuleEvents) -> None:
    """The body of a module's thread: load, run (repeat, restart), report the end.
    Never raises: anything unexpected ends the module with a `trap` status."""
    run.thread_id = threading.get_native_id()
    status: dict[str, Any] = {"code": -1, "reason": "trap", "message": "not started"}
    try:
        engine = make_engine(False)  # its own, so a delete can interrupt just this module
        try:
            runner = _loaded(run, engine)
            run.engine = engine
        except (ModuleError, ValueError) as exc:
            if run.resume_from is not None:
                events.resumed(run, str(exc))
            else:
                log.error("create of module %s refused: %s", run.name, exc)
                events.refused(run, f"cannot load {run.spec.path.name}: {exc}")
            return
        if run.resume_from is None:
            events.started(run)
        watcher = threading.Thread(target=_watch, args=(run, engine), name=f"watch-{run.name}", daemon=True)
        watcher.start()
        status = _run_repeatedly(run, runner, events)
    except Exception as exc:
        log.exception("module %s failed unexpectedly", run.name)
        status = {"code": -1, "reason": "trap", "message": f"internal error: {type(exc).__name__}: {exc}"}
    finally:
        run.done.set()
        run.wakeup.set()
    events.ended(run, status)


# one run of a module: (run, stdout, runs done, restarts, events) -> its outcome, or its final status
RunOnce = Callable[[ModuleRun, Callable[[bytes], None], int, int, "ModuleEvents"], "RunOutcome | dict[str, Any]"]


def _loaded(run: ModuleRun, engine: Any) -> RunOnce:
    """How each run of this module goes: as a migratable run when it can be one
    (deciding `run.why_not_movable`), else as before."""
    channels = run.channels or ModuleChannels([], lambda _c, _p, gone: gone(), run.name)
    if run.code is not None:  # it came with a move: these are already the migratable bytes
        run.prepared = Migratable(run.code)
    elif not run.migratable:
        run.why_not_movable = "migration is off for it (runtime.conf orchestrator.migratable or args.migratable)"
    elif run.spec.dirs:
        run.why_not_movable = "it has preopened directories: open files cannot travel"
    else:
        run.prepared = prepare(module_bytes(run.spec.path))
        run.why_not_movable = run.prepared.why_not
    if run.prepared is None or run.prepared.why_not is not None:
        if run.why_not_movable:
            log.info("module %s cannot move with its state: %s", run.name, run.why_not_movable)
        loaded = load(run.spec.path, engine=engine, channels=channels)
        return lambda r, out, _done, _restarts, _events: run_module(
            loaded, "_start", b"", WasmLimits(memory_mb=r.memory_mb), argv=[r.spec.name, *r.spec.argv], env=r.spec.env,
            dirs=r.spec.dirs, stop=r.stop, stdout=out, deadline_ticks=1, memory=r.memory)
    module = compile_module(engine, run.prepared.data, False)
    sha = hashlib.sha256(run.prepared.data).hexdigest()
    if run.resume_from is not None and run.resume_from.module_sha256 != sha:
        raise ValueError("the checkpoint was taken from other module bytes")
    run.why_not_movable = None

    def run_once(r: ModuleRun, out: Callable[[bytes], None], done: int, restarts: int,
                 events: ModuleEvents) -> RunOutcome | dict[str, Any]:
        try:
            resumable = ResumableRun(engine, module, sha, argv=[r.spec.name, *r.spec.argv], env=r.spec.env,
                                     stdout=out, memory_mb=r.memory_mb, stop=r.stop, probe=r.memory, channels=channels)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            outcome = RunOutcome(b"", b"", instantiated=False)
            ended_how(outcome, exc, r.stop)
            return outcome
        try:
            if r.resume_from is not None:
                checkpoint, r.resume_from = r.resume_from, None
                try:
                    resumable.restore(checkpoint)
                    if r.channels is not None:
                        r.channels.restore(checkpoint.channels)
                except ValueError as exc:
                    events.resumed(r, str(exc))
                    return {"code": -1, "reason": "trap", "message": f"could not go on from its checkpoint: {exc}"}
                events.resumed(r, None)
            r.current = resumable
            result = resumable.run()
            while isinstance(result, Checkpoint):
                verdict, message = _paused(r, result, done, restarts)
                if verdict == MOVED:
                    return {"code": -1, "reason": "deleted", "message": message}
                if verdict == STOP:
                    return {"code": -1, "reason": "deleted", "message": "stopped by a delete"}
                result = resumable.go_on()
            return result
        finally:
            r.current = None
            resumable.close()

    return run_once


def _paused(run: ModuleRun, ck: Checkpoint, done: int, restarts: int) -> tuple[str, str]:
    """The module stopped at a safe point: hand its checkpoint to whoever asked, wait for the verdict."""
    asked = run.pause_asked
    ck.runs_done, ck.restarts, ck.elapsed_s = done, restarts, run.elapsed_s
    if run.channels is not None:
        ck.channels = run.channels.snapshot()
    if asked is None or not asked.checkpoint.set_running_or_notify_cancel():
        run.pause_asked = None
        return GO_ON, ""  # the asker gave up meanwhile
    asked.paused_at = time.monotonic()
    if asked.encoded:
        ck.base_sha256 = asked.base_sha256 if asked.base is not None else None
        asked.blob = encode(ck, base=asked.base if ck.base_sha256 else None)
    asked.checkpoint.set_result(ck)
    verdict = asked.verdict()
    run.pause_asked = None
    return verdict


def _run_repeatedly(run: ModuleRun, run_once: RunOnce, events: ModuleEvents) -> dict[str, Any]:
    spec = run.spec

    def out(chunk: bytes) -> None:
        run.active = time.time()
        events.output(run, bytes(chunk))

    status: dict[str, Any] = {"code": 0, "reason": "exited", "message": "finished"}
    restarts, done_runs = 0, 0
    if run.resume_from is not None:
        restarts, done_runs = run.resume_from.restarts, run.resume_from.runs_done
    while done_runs < spec.repeat:
        if run.stop.is_set():
            return {"code": -1, "reason": "deleted", "message": "stopped by a delete"}
        if run.channels is not None and run.resume_from is None:
            run.channels.begin_run()
        outcome = run_once(run, out, done_runs, restarts, events)
        if isinstance(outcome, dict):
            return outcome
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
        limit = run.spec.limit_s
        run.wakeup.wait(None if limit is None else max(0.0, limit - run.elapsed_s))
        if not run.done.is_set() and not run.stop.is_set():
            run.time_out()
    except Exception:
        log.exception("the time limit of module %s failed; stopping it", run.name)
        run.request_stop()
