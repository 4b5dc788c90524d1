"""WebAssembly components, run in wasmtime, sandboxed.

Each module is compiled once (and kept in an on-disk cache of compiled
artifacts keyed by the module's hash and the engine settings); each call gets a
fresh instance in a fresh store, so no state leaks between requests. A module
sees no files, no network and no environment: only its stdin (the request
body), its stdout (the response) and its stderr (kept for error messages).
Wall time is bounded with epoch interruption, memory with store limits, and
optionally instructions with fuel.

Calls release the GIL, so they run on a small thread pool and a slow module
delays only its own flow.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import importlib.metadata
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

from .config import WasmComponent, WasmLimits
from .drivers import decode_response
from .errors import Timeout, WasmTrap
from .flows import Call

log = logging.getLogger("wasm")
EPOCH_TICK_S = 0.005
MiB = 1024 * 1024
WASMTIME_VERSION = importlib.metadata.version("wasmtime")


class ModuleError(Exception):
    """A module that cannot be loaded: missing, invalid, or without the export asked for."""


def module_bytes(path: Path) -> bytes:
    """A module's binary: `.wasm` as it is, `.wat` compiled from text."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModuleError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix == ".wat" or not data.startswith(b"\0asm"):
        try:
            return wasmtime.wat2wasm(data.decode("utf-8"))
        except (UnicodeDecodeError, wasmtime.WasmtimeError) as exc:
            raise ModuleError(f"{path.name} is neither a WebAssembly binary nor valid WAT: {str(exc).splitlines()[0]}") from None
    return data


def make_engine(fuel: bool) -> wasmtime.Engine:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = fuel
    return wasmtime.Engine(cfg)


def cache_dir() -> Path:
    base = os.environ.get("RM_WASM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                           "runtime_manager", "wasm")
    return Path(base)


def compile_module(engine: wasmtime.Engine, data: bytes, fuel: bool) -> wasmtime.Module:
    """Compile, or load the compiled artifact from the cache (keyed by module hash,
    wasmtime version and engine settings: an artifact only loads into a matching engine)."""
    key = hashlib.sha256(data + f"|wasmtime {WASMTIME_VERSION}|epoch|fuel={fuel}".encode()).hexdigest()
    path = cache_dir() / f"{key}.cwasm"
    if path.is_file():
        try:
            return wasmtime.Module.deserialize_file(engine, str(path))
        except wasmtime.WasmtimeError:
            log.warning("compiled cache entry %s unusable; compiling again", path.name)
    try:
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as exc:
        raise ModuleError(f"invalid module: {str(exc).splitlines()[0]}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(module.serialize())
        tmp.replace(path)
    except OSError as exc:  # a read-only home is no reason to fail
        log.debug("cannot cache compiled module: %s", exc)
    return module


def check_exports(module: wasmtime.Module, names: Iterable[str]) -> list[str]:
    """Problems with the exports that endpoints name: each must be a function without parameters."""
    exports = {e.name: e.type for e in module.exports}
    problems = []
    for name in names:
        kind = exports.get(name)
        if kind is None:
            funcs = sorted(n for n, t in exports.items() if isinstance(t, wasmtime.FuncType))
            problems.append(f"no exported function '{name}' (exports: {', '.join(funcs) or 'none'})")
        elif not isinstance(kind, wasmtime.FuncType):
            problems.append(f"export '{name}' is not a function")
        elif kind.params:
            problems.append(f"function '{name}' takes parameters; it must take none (input comes on stdin)")
    return problems


def inspect_component(module_path: Path, endpoints: dict[str, str]) -> list[str]:
    """Load-time check of a WASM component: the module loads and exports its endpoints."""
    try:
        data = module_bytes(module_path)
        module = compile_module(_shared_engine(False), data, False)
    except ModuleError as exc:
        return [str(exc)]
    return check_exports(module, endpoints.values())


_engines: dict[bool, wasmtime.Engine] = {}
_engines_lock = threading.Lock()


def _shared_engine(fuel: bool) -> wasmtime.Engine:
    """The process's engines (one with fuel, one without), and the one thread that
    advances their epochs: the clock of every time limit."""
    with _engines_lock:
        if fuel not in _engines:
            _engines[fuel] = make_engine(fuel)
            if len(_engines) == 1:
                threading.Thread(target=_tick_epochs, name="wasm-epoch", daemon=True).start()
        return _engines[fuel]


def _tick_epochs() -> None:
    while True:
        time.sleep(EPOCH_TICK_S)
        for engine in list(_engines.values()):
            engine.increment_epoch()


@dataclass
class RunOutcome:
    stdout: bytes
    stderr: bytes
    exit_code: int | None = None  # None: returned normally
    trap: str | None = None  # "timeout", "out_of_fuel", "out_of_memory" or the trap's message
    memory_bytes: int = 0


@dataclass
class LoadedModule:
    engine: wasmtime.Engine
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    fuel: bool
    memory_stdio: bool = False


# ----- stdio in memory ---------------------------------------------------------------
# wasmtime's WASI reads and writes files through a thread pool of its own: about
# 65 µs per call here, three calls for a small echo. A flow step's module has no
# file but stdin, stdout and stderr, so `fd_read` and `fd_write` are served from
# Python buffers instead (every other WASI call stays wasmtime's).
ERRNO_BADF = 8
ERRNO_FBIG = 22
MAX_OUTPUT = 64 * MiB
_stdio = threading.local()  # the buffers of the call running on this thread


def _iovecs(caller: wasmtime.Caller, memory: wasmtime.Memory, iovs: int, count: int) -> list[tuple[int, int]]:
    raw = memory.read(caller, iovs, iovs + 8 * count)
    return [(int.from_bytes(raw[i : i + 4], "little"), int.from_bytes(raw[i + 4 : i + 8], "little")) for i in range(0, 8 * count, 8)]


def _fd_read(caller: wasmtime.Caller, fd: int, iovs: int, count: int, nread: int) -> int:
    memory = caller.get("memory")
    if fd != 0 or not isinstance(memory, wasmtime.Memory):
        return ERRNO_BADF
    data, pos, total = _stdio.stdin, _stdio.stdin_pos, 0
    for ptr, length in _iovecs(caller, memory, iovs, count):
        chunk = data[pos : pos + length]
        if chunk:
            memory.write(caller, chunk, ptr)
        pos += len(chunk)
        total += len(chunk)
        if len(chunk) < length:
            break
    _stdio.stdin_pos = pos
    memory.write(caller, total.to_bytes(4, "little"), nread)
    return 0


def _fd_write(caller: wasmtime.Caller, fd: int, iovs: int, count: int, nwritten: int) -> int:
    memory = caller.get("memory")
    if fd not in (1, 2) or not isinstance(memory, wasmtime.Memory):
        return ERRNO_BADF
    out: bytearray = _stdio.stdout if fd == 1 else _stdio.stderr
    total = 0
    for ptr, length in _iovecs(caller, memory, iovs, count):
        if len(out) + length > MAX_OUTPUT:
            return ERRNO_FBIG
        out += memory.read(caller, ptr, ptr + length)
        total += length
    memory.write(caller, total.to_bytes(4, "little"), nwritten)
    return 0


def _io_type() -> wasmtime.FuncType:
    # a new one each time: wasmtime-py may consume the type it is given
    return wasmtime.FuncType([wasmtime.ValType.i32() for _ in range(4)], [wasmtime.ValType.i32()])


def load(path: Path, fuel: bool = False, engine: wasmtime.Engine | None = None, memory_stdio: bool = False) -> LoadedModule:
    """Compile (or fetch from the cache) and link a module. Without `engine`, the
    process's shared engine, whose epochs the ticker thread advances; with one of
    your own, you advance its epoch yourself (see `run_module`'s deadline).
    `memory_stdio`: serve stdin/stdout/stderr from memory (for modules without files)."""
    engine = engine or _shared_engine(fuel)
    module = compile_module(engine, module_bytes(path), fuel)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    if memory_stdio:
        linker.allow_shadowing = True
        linker.define_func("wasi_snapshot_preview1", "fd_read", _io_type(), _fd_read, access_caller=True)
        linker.define_func("wasi_snapshot_preview1", "fd_write", _io_type(), _fd_write, access_caller=True)
    return LoadedModule(engine, module, linker.instantiate_pre(module), fuel, memory_stdio)


def _cause(exc: Exception) -> str:
    """The useful line of a wasmtime error: what follows "Caused by:", not the backtrace."""
    text = str(exc)
    if "Caused by:" in text:
        lines = [line.strip() for line in text.split("Caused by:", 1)[1].splitlines() if line.strip()]
        if lines:
            return lines[0]
    return text.splitlines()[0] if text else type(exc).__name__


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
    return fd


def _read_fd(fd: int, limit: int = 64 * MiB) -> bytes:
    size = min(os.fstat(fd).st_size, limit)
    return os.pread(fd, size, 0) if size else b""


def run_module(
    loaded: LoadedModule,
    function: str,
    stdin: bytes = b"",
    limits: WasmLimits | None = None,
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
    dirs: list[tuple[str, str]] | None = None,
    stop: threading.Event | None = None,
    stdout: Callable[[bytes], None] | None = None,
    deadline_ticks: int | None = None,
) -> RunOutcome:
    """Run one exported function in a fresh instance. Blocking: call it on a worker thread.
    `dirs` are (host path, guest path) pairs to preopen; nothing else is visible.
    `stdout`, when given, receives the output as it is written instead of at the end.
    `deadline_ticks` overrides the time limit, in epochs of the module's engine."""
    limits = limits or WasmLimits()
    store = wasmtime.Store(loaded.engine)
    ticks = deadline_ticks if deadline_ticks is not None else int(limits.timeout_ms / 1000 / EPOCH_TICK_S) + 1
    store.set_epoch_deadline(max(1, ticks))
    if loaded.fuel:
        store.set_fuel(limits.fuel if limits.fuel is not None else 2**62)
    store.set_limits(memory_size=limits.memory_mb * MiB)
    if loaded.memory_stdio:
        return _run_in_memory(loaded, function, stdin, limits, store, argv, env, stop)
    fds = [_memfd("stdin", stdin), _memfd("stdout"), _memfd("stderr")]
    pump: threading.Thread | None = None
    if stdout is not None:
        # Stream through a pipe read by a Python thread (not wasmtime's stdout_custom,
        # whose callback runs on a wasmtime thread and can outlive the interpreter).
        read_end, write_end = os.pipe()
        fds[1] = write_end
        pump = threading.Thread(target=_pump, args=(read_end, stdout), name="wasm-stdout", daemon=True)
        pump.start()
    try:
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv or ["module"]
        if env:
            wasi.env = list(env.items())
        for host, guest in dirs or []:
            wasi.preopen_dir(host, guest)
        wasi.stdin_file = f"/proc/self/fd/{fds[0]}"
        wasi.stdout_file = f"/proc/self/fd/{fds[1]}"
        wasi.stderr_file = f"/proc/self/fd/{fds[2]}"
        store.set_wasi(wasi)  # without it the first WASI call aborts the process (NOTES.md)
        outcome = _call(loaded, function, store, limits, stop)
        if pump is None:
            outcome.stdout = _read_fd(fds[1])
        outcome.stderr = _read_fd(fds[2], 4096)
        return outcome
    finally:
        store.close()  # closes the module's own handles on the files now
        for fd in fds:
            os.close(fd)
        if pump is not None:
            pump.join(5)  # all output is handed on before the caller reports the end


def _call(loaded: LoadedModule, function: str, store: wasmtime.Store, limits: WasmLimits,
          stop: threading.Event | None) -> RunOutcome:
    """Instantiate and call; map every way of ending onto a RunOutcome."""
    outcome = RunOutcome(b"", b"")
    memory = None
    try:
        instance = loaded.pre.instantiate(store)
        exports = instance.exports(store)
        memory = exports.get("memory")
        exports[function](store)
    except wasmtime.ExitTrap as exc:
        outcome.exit_code = exc.code
    except wasmtime.Trap as exc:
        code = exc.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            outcome.trap = "deleted" if stop is not None and stop.is_set() else "timeout"
        elif code == wasmtime.TrapCode.OUT_OF_FUEL:
            outcome.trap = "out_of_fuel"
        else:
            outcome.trap = _cause(exc)
    except wasmtime.WasmtimeError as exc:
        outcome.trap = _cause(exc)
    if isinstance(memory, wasmtime.Memory):
        outcome.memory_bytes = memory.data_len(store)
        near_limit = outcome.memory_bytes + 16 * 65536 > limits.memory_mb * MiB
        if outcome.trap and outcome.trap not in ("timeout", "deleted", "out_of_fuel") and near_limit:
            outcome.trap = f"out_of_memory ({outcome.trap})"
    return outcome


def _run_in_memory(loaded: LoadedModule, function: str, stdin: bytes, limits: WasmLimits, store: wasmtime.Store,
                   argv: list[str] | None, env: dict[str, str] | None, stop: threading.Event | None) -> RunOutcome:
    wasi = wasmtime.WasiConfig()
    wasi.argv = argv or ["module"]
    if env:
        wasi.env = list(env.items())
    store.set_wasi(wasi)  # without it the first WASI call aborts the process (NOTES.md)
    _stdio.stdin, _stdio.stdin_pos, _stdio.stdout, _stdio.stderr = stdin, 0, bytearray(), bytearray()
    try:
        outcome = _call(loaded, function, store, limits, stop)
        outcome.stdout, outcome.stderr = bytes(_stdio.stdout), bytes(_stdio.stderr[:4096])
        return outcome
    finally:
        _stdio.stdin = _stdio.stdout = _stdio.stderr = b""
        store.close()


def _pump(fd: int, sink: Callable[[bytes], None]) -> None:
    try:
        while chunk := os.read(fd, 65536):
            try:
                sink(chunk)
            except Exception:
                log.exception("stdout consumer failed")
    finally:
        os.close(fd)


class WasmPool(concurrent.futures.Executor):
    """Threads for WebAssembly calls. The first thread takes every call; each
    further one takes calls only while all threads before it are held by a call
    running longer than `slow_s`. Short calls thus run on one thread, without
    several threads taking turns at the GIL (measured: two busy threads were
    slower than one), and a slow module still delays only its own flow."""

    def __init__(self, threads: int = 2, slow_s: float = 0.02) -> None:
        self.slow_s = slow_s
        self._queue: collections.deque[tuple[concurrent.futures.Future, Callable[[], Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = [threading.Condition(self._lock) for _ in range(threads)]
        self._started: list[float | None] = [None] * threads
        self._asleep = [False] * threads  # waiting with no timeout: only a notify wakes it
        self._closed = False
        for i in range(threads):
            threading.Thread(target=self._work, args=(i,), name=f"wasm_{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the WebAssembly pool is closed")
            self._queue.append((fut, functools.partial(fn, *args, **kwargs)))
            self._wake[0].notify()
            if len(self._wake) > 1 and self._asleep[1] and self._started[0] is not None:
                self._wake[1].notify()  # a helper starts watching the first thread
        return fut

    def _may_take(self, i: int) -> bool:
        now = time.monotonic()
        return all(start is not None and now - start > self.slow_s for start in self._started[:i])

    def _work(self, i: int) -> None:
        while True:
            with self._lock:
                while not self._closed and not (self._queue and self._may_take(i)):
                    # helpers look again while calls wait: the threads before them may get stuck
                    self._asleep[i] = not (i and self._queue)
                    self._wake[i].wait(None if self._asleep[i] else self.slow_s / 4)
                self._asleep[i] = False
                if self._closed:
                    return
                fut, call = self._queue.popleft()
                self._started[i] = time.monotonic()
                if i + 1 < len(self._wake) and self._queue and self._asleep[i + 1]:
                    self._wake[i + 1].notify()  # the next helper starts watching this thread
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(call())
                except BaseException as exc:
                    fut.set_exception(exc)
            with self._lock:
                self._started[i] = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            for cond in self._wake:
                cond.notify_all()


class WasmRunner:
    """The WASM step driver's state: compiled modules, the epoch clock, a thread pool."""

    def __init__(self, components: Iterable[Any], threads: int = 2) -> None:
        self.modules: dict[str, LoadedModule] = {}
        for comp in components:
            if isinstance(comp, WasmComponent):
                started = time.perf_counter()
                self.modules[comp.name] = load(comp.module, fuel=comp.limits.fuel is not None, memory_stdio=True)
                log.info("loaded %s for component %s in %.1f ms", comp.module.name, comp.name, (time.perf_counter() - started) * 1000)
        self.pool = WasmPool(threads)

    async def call(self, comp: WasmComponent, call: Call, body: bytes) -> Any:
        loaded = self.modules[comp.name]
        function = comp.endpoints[call.endpoint]
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(self.pool, run_module, loaded, function, body, comp.limits, [comp.name])
        where = f"step {call.number} ({comp.name} endpoint {call.endpoint}, {function})"
        failure = dict(step=call.number, component=comp.name, endpoint=call.endpoint)
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
        return decode_response(outcome.stdout)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
