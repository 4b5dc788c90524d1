"""One sandboxed run of a WebAssembly module in wasmtime.

Each call gets a fresh instance (in a fresh store, or for a flow step one of a
few kept stores: see `_run_in_memory`), so no state leaks between runs. A module sees no files, no network and no environment unless given:
its stdin, its stdout and its stderr (kept for error messages), and for
orchestrator modules argv, env and preopened directories. Wall time is bounded
with epoch interruption, memory with store limits, and optionally instructions
with fuel.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from ..config import WasmLimits
from .channels import ModuleChannels
from .channels import define as define_channels
from .modules import EPOCH_TICK_S, POOL_SLOTS, MiB, compile_module, compile_step_module, module_bytes

log = logging.getLogger("wasm")

@dataclass
class RunOutcome:
    stdout: bytes
    stderr: bytes
    exit_code: int | None = None  # None: returned normally
    trap: str | None = None  # "timeout", "out_of_fuel", "out_of_memory" or the trap's message
    memory_bytes: int = 0
    output_overflow: bool = False  # it wrote more to stdout than `max_output` allowed
    instantiated: bool = True  # False: no instance could be made (the trap says why)


class MemoryProbe:
    """The linear-memory size of a run in progress, readable from another thread
    (an orchestrator's keepalive while the module runs).

    The read is wasmtime's memory size query: it looks at the memory's current
    length and nothing the running code changes otherwise. The lock keeps it off
    a store that is being closed; after the run the last size stays."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: Callable[[], int] | None = None
        self.last = 0

    def attach(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        with self._lock:
            self._read = lambda: memory.data_len(store)

    def detach(self) -> None:
        with self._lock:
            if self._read is not None:
                self.last = self._read()
                self._read = None

    def size(self) -> int:
        with self._lock:
            if self._read is not None:
                self.last = self._read()
            return self.last


@dataclass
class LoadedModule:
    engine: wasmtime.Engine
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    fuel: bool
    memory_stdio: bool = False
    # exported functions without results, called through wasmtime's C API
    # directly (`_call_raw`) when the module has no host functions of
    # wasmtime-py's (a flow step's module: WASI and the stdio above only)
    raw_calls: frozenset[str] = frozenset()


# ----- stdio in memory ---------------------------------------------------------------
# wasmtime's WASI reads and writes files through a thread pool of its own: about
# 65 µs per call here, three calls for a small echo. A flow step's module has no
# file but stdin, stdout and stderr, so `fd_read` and `fd_write` are served from
# Python buffers instead (every other WASI call stays wasmtime's).
#
# The module's linear memory is read and written through a memoryview made at
# its first host call (plain Python slicing and `struct`, no foreign call per
# access: a foreign call through ctypes costs about a microsecond here, and a
# host call made five of them). The view stays valid while the instance lives:
# the engines' memories never move (`modules.make_engine`), and they only grow,
# so a pointer past the view's end makes it look again at the memory's size.
ERRNO_BADF = 8
ERRNO_FBIG = 22
ERRNO_FAULT = 21
ERRNO_INVAL = 28
IOV_MAX = 1024  # iovecs in one call, at most (as POSIX readv/writev)
MAX_OUTPUT = 64 * MiB
MAX_STDERR = 64 * 1024  # kept for error messages; more is accepted and dropped


class _Stdio(threading.local):
    """The buffers of the call running on this thread, and its memory when known."""

    context: Any = None
    memory: Any = None
    view: memoryview | None = None  # the memory's bytes, as far as last looked (`_view`)


_stdio = _Stdio()
_U32 = struct.Struct("<I")
_IOVEC = struct.Struct("<II")
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype, _memory_view.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200


def _view(context: Any, memory: Any) -> memoryview:
    """The memory's bytes now (valid while its instance lives)."""
    size = memory_size(context, memory)
    return _memory_view(memory_base(context, memory), size, _PYBUF_WRITE) if size else memoryview(bytearray())


def _larger(view: memoryview) -> memoryview:
    """`view`, or a new one when the running call's memory has grown since."""
    if _stdio.memory is None:
        return view
    grown = _view(_stdio.context, _stdio.memory)
    if len(grown) > len(view):
        _stdio.view = grown
        return grown
    return view


def _iovecs(view: memoryview, iovs: int, count: int, out: int) -> list[tuple[int, int]] | None:
    """The (pointer, length) pairs of a WASI iovec array, or None when the array,
    a buffer or the 4-byte result at `out` lies outside `view`."""
    size = len(view)
    if iovs + 8 * count > size or out + 4 > size:
        return None
    if count == 1:  # the usual call: one buffer
        ptr, length = _IOVEC.unpack_from(view, iovs)
        return None if ptr + length > size else [(ptr, length)]
    fields = struct.unpack_from(f"<{2 * count}I", view, iovs)
    vecs = list(zip(fields[::2], fields[1::2], strict=True))
    return None if any(ptr + length > size for ptr, length in vecs) else vecs


def _checked(view: memoryview, iovs: int, count: int, out: int) -> tuple[memoryview, list[tuple[int, int]] | None]:
    """The iovecs within memory, looking again at its size when they seem not to be."""
    vecs = _iovecs(view, iovs, count, out)
    if vecs is None:
        view = _larger(view)
        vecs = _iovecs(view, iovs, count, out)
    return view, vecs


def _fd_read(view: memoryview, fd: int, iovs: int, count: int, nread: int) -> int:
    if fd != 0:
        return ERRNO_BADF
    if count > IOV_MAX:
        return ERRNO_INVAL
    view, vecs = _checked(view, iovs, count, nread)
    if vecs is None:
        return ERRNO_FAULT
    data, pos, total = _stdio.stdin, _stdio.stdin_pos, 0
    for ptr, length in vecs:
        chunk = data[pos : pos + length]
        view[ptr : ptr + len(chunk)] = chunk
        pos += len(chunk)
        total += len(chunk)
        if len(chunk) < length:
            break
    _stdio.stdin_pos = pos
    _U32.pack_into(view, nread, total)
    return 0


def _fd_write(view: memoryview, fd: int, iovs: int, count: int, nwritten: int) -> int:
    if fd not in (1, 2):
        return ERRNO_BADF
    if count > IOV_MAX:
        return ERRNO_INVAL
    view, vecs = _checked(view, iovs, count, nwritten)
    if vecs is None:
        return ERRNO_FAULT
    out: bytearray = _stdio.stdout if fd == 1 else _stdio.stderr
    total = 0
    for ptr, length in vecs:
        if fd == 2:
            if len(out) < MAX_STDERR:
                out += view[ptr : ptr + min(length, MAX_STDERR - len(out))]
        elif len(out) + length > _stdio.limit:
            _stdio.overflow = True
            return ERRNO_FBIG
        else:
            out += view[ptr : ptr + length]
        total += length
    _U32.pack_into(view, nwritten, total)
    return 0


# `fd_read` and `fd_write` are defined on wasmtime's C API directly (wasmtime-py's
# own `define_func` wraps every call in `Caller` and `Val` objects: about half of
# a short call went there). The callback takes its arguments as plain addresses,
# reads its four i32 arguments from the raw value array, and writes its result
# back in place. It uses wasmtime-py's ctypes bindings (`wasmtime._ffi`), pinned
# with wasmtime in requirements.txt; the tests run every flow-step module through it.
MEMORY_NAME = ctypes.create_string_buffer(b"memory")
EXTERN_FUNC = ffi.WASMTIME_EXTERN_FUNC.value
EXTERN_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value
_WASI = ctypes.create_string_buffer(b"wasi_snapshot_preview1")


def _quick(name: str, restype: Any, *argtypes: Any) -> Any:
    """A function of wasmtime's C API called without releasing the GIL: a lookup
    that runs no WebAssembly. ctypes lets go of the GIL around every foreign call
    by default, and on a busy process each time may mean waiting for another
    thread to give it back (up to its 5 ms switch interval)."""
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ffi.dll))


_Context = ctypes.POINTER(ffi.wasmtime_context_t)
_Caller = ctypes.c_void_p  # a wasmtime_caller_t *, as the host call gets it
caller_export_get = _quick("wasmtime_caller_export_get", ctypes.c_bool, _Caller,
                            ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ffi.wasmtime_extern_t))
caller_context = _quick("wasmtime_caller_context", _Context, _Caller)
memory_size = _quick("wasmtime_memory_data_size", ctypes.c_size_t, _Context, ctypes.POINTER(ffi.wasmtime_memory_t))
# the base address as a plain int (the binding's own returns a pointer object)
memory_base = _quick("wasmtime_memory_data", ctypes.c_void_p, _Context, ctypes.POINTER(ffi.wasmtime_memory_t))
_instance_export_get = _quick("wasmtime_instance_export_get", ctypes.c_bool, _Context,
                              ctypes.POINTER(ffi.wasmtime_instance_t), ctypes.c_char_p, ctypes.c_size_t,
                              ctypes.POINTER(ffi.wasmtime_extern_t))
_set_epoch_deadline = _quick("wasmtime_context_set_epoch_deadline", None, _Context, ctypes.c_uint64)
_store_context = _quick("wasmtime_store_context", _Context, ctypes.POINTER(ffi.wasmtime_store_t))
RAW_ARGS = struct.Struct("<I12xI12xI12xI12x")  # four i32 arguments, one per 16-byte wasmtime_val_raw_t
_I32 = ctypes.c_int32
# wasmtime's wasmtime_func_unchecked_callback_t with its pointers as plain ints
# (ctypes makes an object of each typed pointer on every call)
_HostCall = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _caller_view(caller: int) -> memoryview | None:
    """The caller's memory, looked up by name (a call not made by `_call_raw`)."""
    item = ffi.wasmtime_extern_t()
    if not caller_export_get(caller, MEMORY_NAME, 6, ctypes.byref(item)) or item.kind != EXTERN_MEMORY:
        return None
    return _view(caller_context(caller), ctypes.byref(item.of.memory))


def _raw_host_call(fn: Callable[[memoryview, int, int, int, int], int]) -> Any:
    def callback(_env: int, caller: int, args: int, _n: int) -> int:
        try:
            view = _stdio.view
            if view is None:
                view = _stdio.view = _view(_stdio.context, _stdio.memory) if _stdio.memory is not None \
                    else _caller_view(caller)
            # the arguments are unsigned 32-bit offsets
            _I32.from_address(args).value = ERRNO_BADF if view is None else \
                fn(view, *RAW_ARGS.unpack(ctypes.string_at(args, RAW_ARGS.size)))
        except Exception:  # never into wasmtime: the module gets an error number
            log.exception("stdio host call failed")
            _I32.from_address(args).value = ERRNO_FAULT
        return 0  # no trap

    # as the type wasmtime-py's binding takes (the cast keeps the callback alive)
    return ctypes.cast(_HostCall(callback), ffi.wasmtime_func_unchecked_callback_t)


_RAW_FD_READ = _raw_host_call(_fd_read)
_RAW_FD_WRITE = _raw_host_call(_fd_write)


def define_raw(linker: wasmtime.Linker, name: str, callback: Any) -> None:
    buf = ctypes.create_string_buffer(name.encode())
    ty = _io_type()  # held until the call returns: its pointer must stay valid
    error = ffi.wasmtime_linker_define_func_unchecked(linker.ptr(), _WASI, len(_WASI.value), buf, len(name),
                                                      ty.ptr(), callback, None, _NO_FINALIZER)
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


# No finalizer: a NULL pointer, not a Python callback. wasmtime calls a finalizer
# when it drops the function, which may be during the interpreter's shutdown,
# after a Python callback's code is gone (seen: a segfault at exit).
_NO_FINALIZER = ctypes.cast(None, ctypes.CFUNCTYPE(None, ctypes.c_void_p))


def _io_type() -> wasmtime.FuncType:
    # a new one each time: wasmtime-py may consume the type it is given
    return wasmtime.FuncType([wasmtime.ValType.i32() for _ in range(4)], [wasmtime.ValType.i32()])


def load(path: Path, fuel: bool = False, engine: wasmtime.Engine | None = None, memory_stdio: bool = False,
         channels: ModuleChannels | None = None) -> LoadedModule:
    """Compile (or fetch from the cache) and link a module. Without `engine`, the
    process's shared engine, whose epochs `EPOCH_CLOCK` advances; with one of
    your own, you advance its epoch yourself (see `run_module`'s deadline).
    `memory_stdio`: serve stdin/stdout/stderr from memory (for modules without files).
    `channels`: the module may import the `channels` functions (`channels.py`)."""
    if engine is None:
        engine, module = compile_step_module(path, fuel)
    else:
        module = compile_module(engine, module_bytes(path), fuel)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    if channels is not None:
        define_channels(linker, channels)
    if memory_stdio:
        linker.allow_shadowing = True
        define_raw(linker, "fd_read", _RAW_FD_READ)
        define_raw(linker, "fd_write", _RAW_FD_WRITE)
    raw = frozenset(e.name for e in module.exports if isinstance(e.type, wasmtime.FuncType) and not e.type.results) \
        if memory_stdio and channels is None else frozenset()
    return LoadedModule(engine, module, linker.instantiate_pre(module), fuel, memory_stdio, raw)


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
    max_output: int = MAX_OUTPUT,
    memory: MemoryProbe | None = None,
) -> RunOutcome:
    """Run one exported function in a fresh instance. Blocking: call it on a worker thread.
    `dirs` are (host path, guest path) pairs to preopen; nothing else is visible.
    `stdout`, when given, receives the output as it is written instead of at the end.
    `deadline_ticks` overrides the time limit, in epochs of the module's engine.
    `max_output`: stdout beyond it is refused (EFBIG) and the outcome says so
    (modules with stdio in memory). `memory`: where other threads read the
    module's memory size while it runs. No file descriptor outlives the run."""
    limits = limits or WasmLimits()
    ticks = deadline_ticks if deadline_ticks is not None else int(limits.timeout_ms / 1000 / EPOCH_TICK_S) + 1
    if loaded.memory_stdio and not dirs:
        return _run_in_memory(loaded, function, stdin, limits, max(1, ticks), argv, env, stop, max_output, memory)
    store = wasmtime.Store(loaded.engine)
    store.set_epoch_deadline(max(1, ticks))
    if loaded.fuel:
        store.set_fuel(limits.fuel if limits.fuel is not None else 2**62)
    store.set_limits(memory_size=limits.memory_mb * MiB)
    if stop is not None and stop.is_set():  # stopped before it began: after the deadline is set, an interrupt works
        store.close()
        return RunOutcome(b"", b"", trap="deleted")
    fds: list[int] = []
    pump: threading.Thread | None = None
    try:
        fds.append(_memfd("stdin", stdin))
        if stdout is not None:
            # Stream through a pipe read by a Python thread (not wasmtime's stdout_custom,
            # whose callback runs on a wasmtime thread and can outlive the interpreter).
            read_end, write_end = os.pipe()
            fds.append(write_end)
            pump = threading.Thread(target=_pump, args=(read_end, stdout), name="wasm-stdout", daemon=True)
            pump.start()
        else:
            fds.append(_memfd("stdout"))
        fds.append(_memfd("stderr"))
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv or ["module"]
        if env:
            wasi.env = list(env.items())
        for host, guest in dirs or []:
            wasi.preopen_dir(host, guest)
        wasi.stdin_file = f"/proc/self/fd/{fds[0]}"
        wasi.stdout_file = f"/proc/self/fd/{fds[1]}"
        wasi.stderr_file = f"/proc/self/fd/{fds[2]}"
        store.set_wasi(wasi)  # without it the first WASI call aborts the process (docs/dependency-notes.md)
        outcome = _call(loaded, function, store, limits, stop, memory)
        if pump is None:
            outcome.stdout = _read_fd(fds[1])
        outcome.stderr = _read_fd(fds[2], 4096)
        return outcome
    finally:
        if memory is not None:
            memory.detach()
        store.close()  # closes the module's own handles on the files now
        for fd in fds:
            os.close(fd)
        if pump is not None:
            pump.join(5)  # all output is handed on before the caller reports the end


def _call(loaded: LoadedModule, function: str, store: wasmtime.Store, limits: WasmLimits,
          stop: threading.Event | None, probe: MemoryProbe | None = None) -> RunOutcome:
    """Instantiate and call; map every way of ending onto a RunOutcome."""
    if probe is None and function in loaded.raw_calls:
        return _call_raw(loaded, function, store, limits, stop)
    outcome = RunOutcome(b"", b"")
    memory = None
    try:
        try:
            instance = loaded.pre.instantiate(store)
        except wasmtime.WasmtimeError:
            outcome.instantiated = False
            raise
        exports = instance.exports(store)
        memory = exports.get("memory")
        if probe is not None and isinstance(memory, wasmtime.Memory):
            probe.attach(store, memory)
        exports[function](store)
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        ended_how(outcome, exc, stop)
    if isinstance(memory, wasmtime.Memory):
        _memory_used(outcome, memory.data_len(store), limits)
    return outcome


def ended_how(outcome: RunOutcome, exc: wasmtime.Trap | wasmtime.WasmtimeError, stop: threading.Event | None) -> None:
    """How a run that raised ended: an exit code or a named trap."""
    if isinstance(exc, wasmtime.ExitTrap):
        outcome.exit_code = exc.code
    elif isinstance(exc, wasmtime.Trap):
        code = exc.trap_code
        if code == wasmtime.TrapCode.INTERRUPT:
            outcome.trap = "deleted" if stop is not None and stop.is_set() else "timeout"
        elif code == wasmtime.TrapCode.OUT_OF_FUEL:
            outcome.trap = "out_of_fuel"
        else:
            outcome.trap = _cause(exc)
    else:
        outcome.trap = _cause(exc)


def _memory_used(outcome: RunOutcome, size: int, limits: WasmLimits) -> None:
    outcome.memory_bytes = size
    near_limit = size + 16 * 65536 > limits.memory_mb * MiB
    if outcome.trap and outcome.trap not in ("timeout", "deleted", "out_of_fuel") and near_limit:
        outcome.trap = f"out_of_memory ({outcome.trap})"


# A flow step's call through wasmtime's C API: the same instantiate, export
# lookup and call as above, without wasmtime-py's `Instance` (which wraps every
# export of the module), its `Func.__call__` (which builds the function's type
# and value arrays) and its trap context manager: about a third of a short call.
# Only for modules without wasmtime-py host functions (whose exceptions
# wasmtime-py carries across the call) and functions without results.
_NAMES: dict[str, bytes] = {}


def _call_raw(loaded: LoadedModule, function: str, store: wasmtime.Store, limits: WasmLimits,
              stop: threading.Event | None) -> RunOutcome:
    outcome = RunOutcome(b"", b"")
    context = _store_context(store.ptr())
    instance = ffi.wasmtime_instance_t()
    memory = ffi.wasmtime_extern_t()
    func = ffi.wasmtime_extern_t()
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    has_memory = False
    name = _NAMES.get(function) or _NAMES.setdefault(function, function.encode())
    try:
        error = ffi.wasmtime_instance_pre_instantiate(loaded.pre.ptr(), context, ctypes.byref(instance), ctypes.byref(trap))
        outcome.instantiated = not error
        if not error and not trap:
            has_memory = _instance_export_get(context, ctypes.byref(instance), MEMORY_NAME, 6, ctypes.byref(memory)) \
                and memory.kind == EXTERN_MEMORY
            if has_memory:  # the stdio host calls use it instead of looking it up on each call
                _stdio.context, _stdio.memory = context, ctypes.byref(memory.of.memory)
            if not _instance_export_get(context, ctypes.byref(instance), name, len(name), ctypes.byref(func)) \
                    or func.kind != EXTERN_FUNC:
                raise wasmtime.WasmtimeError(f"no exported function '{function}'")
            error = ffi.wasmtime_func_call(context, ctypes.byref(func.of.func), None, 0, None, 0, ctypes.byref(trap))
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        if trap:
            raise wasmtime.Trap._from_ptr(trap)
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        ended_how(outcome, exc, stop)
    finally:
        _stdio.context = _stdio.memory = _stdio.view = None
    if has_memory:
        _memory_used(outcome, memory_size(context, ctypes.byref(memory.of.memory)), limits)
    return outcome


# ----- stores kept for in-memory runs -------------------------------------------------
# Making a store and its WASI context costs about a third of a short call. A run
# with stdio in memory (a flow step: no files, nothing but stdin and stdout) takes
# a store this thread made for the same module and settings, and instantiates the
# module afresh in it: each call still has an instance, a memory, globals and
# tables of its own, and the same limits (memory per instance, time, fuel). A
# store is dropped after REUSE_CALLS instances, once its instances hold
# REUSE_BYTES of memory together (an instance's memory lives as long as its
# store), or after any run that did not end well.
# Instances of a pooled engine (modules.make_engine) take a slot of its pool
# until their store closes: the kept stores of all threads together hold at
# most KEPT_INSTANCES, which leaves slots for the calls starting meanwhile on
# every thread (a store over the budget is closed after its call).
REUSE_CALLS = 32
REUSE_BYTES = 2 * MiB
REUSE_STORES = 16  # per thread
KEPT_INSTANCES = POOL_SLOTS - 200


class _InstanceCount:
    """Instances held by the kept stores of every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> int:
        with self._lock:
            self.value += n
            return self.value


_kept_instances = _InstanceCount()


@dataclass(eq=False)
class _KeptStore:
    loaded: LoadedModule  # held, so its id is not reused while the store is kept
    store: wasmtime.Store
    calls: int = 0
    held: int = 0  # bytes of linear memory its instances hold

    def close(self) -> None:
        self.store.close()
        _kept_instances.add(-self.calls)
        self.calls = 0

    def __del__(self, count: _InstanceCount = _kept_instances) -> None:
        # its thread ended: the store goes with the thread's locals (the count is
        # bound here: at interpreter exit the module's globals may be gone)
        if self.calls:
            count.add(-self.calls)


_kept = threading.local()


def _store_for(loaded: LoadedModule, limits: WasmLimits, argv: list[str] | None,
               env: dict[str, str] | None) -> tuple[tuple[object, ...], _KeptStore]:
    stores: dict[tuple[object, ...], _KeptStore] = _kept.__dict__.setdefault("stores", {})
    key = (id(loaded), limits.memory_mb, tuple(argv or ()), tuple(sorted((env or {}).items())))
    kept = stores.get(key)
    if kept is None:
        store = wasmtime.Store(loaded.engine)
        store.set_limits(memory_size=limits.memory_mb * MiB)
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv or ["module"]
        if env:
            wasi.env = list(env.items())
        store.set_wasi(wasi)  # without it the first WASI call aborts the process (docs/dependency-notes.md)
        kept = stores[key] = _KeptStore(loaded, store)
        while len(stores) > REUSE_STORES:  # the oldest (a module reloaded since, say) goes
            stores.pop(next(iter(stores))).close()
    return key, kept


def _run_in_memory(loaded: LoadedModule, function: str, stdin: bytes, limits: WasmLimits, ticks: int,
                   argv: list[str] | None, env: dict[str, str] | None, stop: threading.Event | None,
                   max_output: int, probe: MemoryProbe | None) -> RunOutcome:
    key, kept = _store_for(loaded, limits, argv, env)
    _arm(kept.store, loaded, limits, ticks)
    if stop is not None and stop.is_set():
        return RunOutcome(b"", b"", trap="deleted")
    _stdio.stdin, _stdio.stdin_pos, _stdio.stdout, _stdio.stderr = stdin, 0, bytearray(), bytearray()

    _stdio.limit, _stdio.overflow = max_output, False
    outcome: RunOutcome | None = None
    try:
        outcome = _call(loaded, function, kept.store, limits, stop, probe)
        if not outcome.instantiated and kept.calls:
            # a store holding instances may have no room for one more (an address-space
            # limit, say): this one goes, and the call runs once more in a new one
            _kept.stores.pop(key, None)
            kept.close()
            key, kept = _store_for(loaded, limits, argv, env)
            _arm(kept.store, loaded, limits, ticks)
            outcome = _call(loaded, function, kept.store, limits, stop, probe)
        outcome.stdout, outcome.stderr = bytes(_stdio.stdout), bytes(_stdio.stderr[:4096])
        outcome.output_overflow = _stdio.overflow
        return outcome
    finally:
        _stdio.stdin = _stdio.stdout = _stdio.stderr = b""
        _stdio.view = None  # (a call through `_call` may have made one)

        if probe is not None:
            probe.detach()
        kept.calls += 1
        kept.held += outcome.memory_bytes if outcome is not None else REUSE_BYTES
        over_budget = _kept_instances.add(1) >= KEPT_INSTANCES
        ended_well = outcome is not None and outcome.trap is None and not outcome.output_overflow
        if not ended_well or kept.calls >= REUSE_CALLS or kept.held >= REUSE_BYTES or over_budget:
            _kept.stores.pop(key, None)
            kept.close()


def _arm(store: wasmtime.Store, loaded: LoadedModule, limits: WasmLimits, ticks: int) -> None:
    """A kept store's limits for its next call: time (and fuel); memory is per instance."""
    _set_epoch_deadline(_store_context(store.ptr()), ticks)
    if loaded.fuel:
        store.set_fuel(limits.fuel if limits.fuel is not None else 2**62)


def _pump(fd: int, sink: Callable[[bytes], None]) -> None:
    try:
        while chunk := os.read(fd, 65536):
            try:
                sink(chunk)
            except Exception:
                log.exception("stdout consumer failed")
    finally:
        os.close(fd)


