"""Running a migratable module so that it can pause at a safe point and go on
later, here or in another process (`migratable.py` made it so).

The safe points are the imports standard output, standard input, sleeping
and a channel read come through; a run defines them itself (instead of
wasmtime's WASI), so that each, when a pause has been asked for, unwinds the
module instead of doing its work:

    pause asked -> at the next safe point: asyncify_start_unwind(buffer), return
                -> `_start` returns early -> asyncify_stop_unwind()
                -> a Checkpoint: memory, every mutable global, the buffer
    go on       -> (a fresh instance: memory and globals written back)
                -> asyncify_start_rewind(buffer), call `_start` again
                -> the same safe point is entered again, rewinding:
                   asyncify_stop_rewind(), then it does its work, once

A safe point unwinds *before* its work (the write, the read, the sleep), so
nothing is done twice or skipped; a sleep that was interrupted by the pause
goes on for what was left of it. The unwound call stack lives in pages this run
adds to the module's memory (BUFFER_PAGES) the first time it pauses.

Stdout and stdin are the module's only files here (a module with preopened
directories is not run this way: its open files could not travel).
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import wasmtime
from wasmtime import _ffi as ffi

from .channels import EAGAIN, ECANCELED, EFAULT, ModuleChannels
from .channels import define as define_channels
from .checkpoint import PAGE, Checkpoint
from .migratable import GLOBAL_EXPORT
from .sandbox import (
    EXTERN_FUNC,
    EXTERN_MEMORY,
    MAX_STDERR,
    MEMORY_NAME,
    RAW_ARGS,
    MemoryProbe,
    RunOutcome,
    caller_context,
    caller_export_get,
    define_raw,
    ended_how,
    memory_base,
    memory_size,
)

log = logging.getLogger("wasm")

BUFFER_PAGES = 4  # 256 KiB for the unwound call stack: thousands of C frames
ERRNO_BADF, ERRNO_INVAL, ERRNO_NOTSUP = 8, 28, 58
UNWINDING = 1  # asyncify_get_state()
_SUB = struct.Struct("<QB7xIxxxxQQH6x")  # a WASI subscription (48 bytes): userdata, tag, clock id, timeout, precision, flags
_FD_SUB = struct.Struct("<QB7xI")
_EVENT = struct.Struct("<QHBxxxxxQH6x")  # an event (32 bytes): userdata, error, type, nbytes, flags
READ_SLICE_MS = 50  # a channel read waits in slices, to notice a pause


class ResumableRun:
    """One run of a migratable module's `_start`, in a store of its own, that
    `pause()` (any thread) stops at its next safe point. `run()` returns the
    outcome when the module ended, or a Checkpoint when it paused; after a
    pause, `go_on()` rewinds it in place (the move did not happen) and
    `close()` lets it go (it moved)."""

    def __init__(self, engine: wasmtime.Engine, module: wasmtime.Module, sha256: str, *,
                 argv: list[str], env: dict[str, str], stdout: Callable[[bytes], None], memory_mb: int,
                 stop: threading.Event, probe: MemoryProbe | None = None,
                 channels: ModuleChannels | None = None) -> None:
        self.sha256 = sha256
        self.stop = stop
        self.stdout_bytes = 0
        self._stdout = stdout
        self._stderr = bytearray()
        self._probe = probe
        self._channels = channels
        self._pause = threading.Event()
        self._wake = threading.Event()
        self._buffer: int | None = None
        self._callbacks: list[Any] = []
        self._closing = threading.Lock()
        self._closed = False
        self._rewinding = False  # a rewind is under way: the next safe point ends it
        self._paused_at = ""
        self._sleep_left_ns = 0  # a sleep cut short by the pause: what is left of it
        self.pause_refused: str | None = None  # why the last pause could not happen
        self.store = wasmtime.Store(engine)
        self.store.set_epoch_deadline(1)
        self.store.set_limits(memory_size=memory_mb * 1024 * 1024)
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv
        if env:
            wasi.env = list(env.items())
        self.store.set_wasi(wasi)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        self._define(linker)
        self.instance = linker.instantiate(self.store, module)
        exports = self.instance.exports(self.store)
        memory = exports.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise wasmtime.WasmtimeError("the module exports no memory")
        self.memory = memory
        self._exports = exports
        self._global_names = [e.name for e in module.exports if e.name.startswith(GLOBAL_EXPORT)]
        if probe is not None:
            probe.attach(self.store, memory)

    # ----- asked from other threads ---------------------------------------------------------
    def pause(self) -> None:
        """Stop at the next safe point (run() then returns a Checkpoint)."""
        self.pause_refused = None
        self._pause.set()
        self._wake.set()

    def cancel_pause(self) -> None:
        self._pause.clear()

    def wake(self) -> None:
        """End a sleep now (the module is being stopped or paused)."""
        self._wake.set()

    # ----- running -----------------------------------------------------------------------
    def run(self) -> RunOutcome | Checkpoint:
        """From the beginning, or from the checkpoint given to `restore`."""
        if self._buffer is not None:
            try:
                self._call("asyncify_start_rewind", self._buffer)
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                outcome = RunOutcome(b"", b"")
                ended_how(outcome, exc, self.stop)
                return outcome
            self._rewinding = True
        return self._run()

    def go_on(self) -> RunOutcome | Checkpoint:
        """Rewind in this instance, after a pause: as if it had not happened."""
        self._pause.clear()
        return self.run()

    def close(self) -> None:
        if self._probe is not None:
            self._probe.detach()
        with self._closing:
            self._closed = True
            self.store.close()

    def memory_copy(self) -> bytes | None:
        """A copy of its memory while it runs (any thread; pages it writes
        meanwhile may be torn: whoever uses the copy compares it again later).
        Its memory never moves while it runs: a 32-bit memory is reserved
        whole (wasmtime's default), so growing does not move it."""
        with self._closing:
            if self._closed:
                return None
            size = self.memory.data_len(self.store)
            return ctypes.string_at(ctypes.addressof(self.memory.data_ptr(self.store).contents), size)

    def _run(self) -> RunOutcome | Checkpoint:
        outcome = RunOutcome(b"", b"")
        try:
            self._exports["_start"](self.store)
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            ended_how(outcome, exc, self.stop)
        if outcome.exit_code is None and outcome.trap is None:
            try:  # the helpers are wasm too: a delete's interrupt can land in them
                if self._call("asyncify_get_state") == UNWINDING:
                    self._call("asyncify_stop_unwind")
                    return self._capture()
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                ended_how(outcome, exc, self.stop)
        outcome.stderr = bytes(self._stderr[:4096])
        outcome.memory_bytes = self.memory.data_len(self.store)
        return outcome

    def _call(self, name: str, *args: Any) -> Any:
        return self._exports[name](self.store, *args)

    def _capture(self) -> Checkpoint:
        size = self.memory.data_len(self.store)
        memory = ctypes.string_at(ctypes.addressof(self.memory.data_ptr(self.store).contents), size)
        values = {name: self._exports[name].value(self.store) for name in self._global_names}
        assert self._buffer is not None
        return Checkpoint(module_sha256=self.sha256, memory=memory, globals=values, buffer=self._buffer,
                          buffer_size=BUFFER_PAGES * PAGE, safe_point=self._paused_at,
                          sleep_left_ns=self._sleep_left_ns, stdout_bytes=self.stdout_bytes)

    def restore(self, ck: Checkpoint) -> None:
        """Memory and globals from a checkpoint (then `run` goes on from it); ValueError when they do not fit."""
        if ck.module_sha256 != self.sha256:
            raise ValueError("the checkpoint was taken from other module bytes")
        have = self.memory.data_len(self.store)
        if len(ck.memory) > have:
            try:
                self.memory.grow(self.store, (len(ck.memory) - have) // PAGE)
            except wasmtime.WasmtimeError:
                raise ValueError(f"its memory ({len(ck.memory) >> 20} MiB) is over the module's limit here") from None
        elif len(ck.memory) < have:
            raise ValueError("the module's memory starts larger than the checkpoint's")
        source = ck.memory if isinstance(ck.memory, bytes) else (ctypes.c_char * len(ck.memory)).from_buffer(ck.memory)
        ctypes.memmove(ctypes.addressof(self.memory.data_ptr(self.store).contents), source, len(ck.memory))
        for name, value in ck.globals.items():
            item = self._exports.get(name)
            if not isinstance(item, wasmtime.Global):
                raise ValueError(f"the module has no global {name}")
            try:
                item.set_value(self.store, value)
            except (TypeError, wasmtime.WasmtimeError) as exc:
                raise ValueError(f"global {name}: {exc}") from None
        self._buffer = ck.buffer
        self._sleep_left_ns = ck.sleep_left_ns
        self.stdout_bytes = ck.stdout_bytes

    # ----- safe points ---------------------------------------------------------------------
    def _unwinds(self, host: _Host, name: str) -> bool:
        """At a safe point's entry: True when the module is to unwind now (the
        import returns at once, its work not done); False when it goes on (after
        a rewind that ends here, too)."""
        if self._rewinding:  # known here, not asked of the module: this runs at every output
            self._rewinding = False
            host.call(b"asyncify_stop_rewind")
            return False
        if not self._pause.is_set():
            return False
        if self._buffer is None:
            pages = host.grow(BUFFER_PAGES)
            if pages is None:
                self.pause_refused = "no room in its memory limit for the unwound call stack"
                self._pause.clear()
                return False
            self._buffer = pages * PAGE
        ctypes.memmove(host.base() + self._buffer,
                       struct.pack("<II", self._buffer + 8, self._buffer + BUFFER_PAGES * PAGE), 8)
        self._paused_at = name
        host.call(b"asyncify_start_unwind", self._buffer)
        return True

    def _define(self, linker: wasmtime.Linker) -> None:
        """fd_write, fd_read and poll_oneoff on wasmtime's C API directly (as
        sandbox.py's stdio): through wasmtime-py's `define_func` each call cost
        about 20 µs more, and a module that prints in a loop makes many."""

        def fd_write(host: _Host, fd: int, iovs: int, count: int, nwritten: int) -> int:
            if self._unwinds(host, "fd_write"):
                return 0
            if fd not in (1, 2):
                return ERRNO_BADF
            data = _gather(host, iovs, count)
            if data is None:
                return EFAULT
            if fd == 1:
                self.stdout_bytes += len(data)
                self._stdout(data)
            elif len(self._stderr) < MAX_STDERR:
                self._stderr += data[: MAX_STDERR - len(self._stderr)]
            return _store_u32(host, nwritten, len(data))

        def fd_read(host: _Host, fd: int, _iovs: int, _count: int, nread: int) -> int:
            if self._unwinds(host, "fd_read"):
                return 0
            if fd != 0:
                return ERRNO_BADF
            return _store_u32(host, nread, 0)  # stdin is empty

        def poll_oneoff(host: _Host, subs: int, events: int, count: int, nevents: int) -> int:
            if self._unwinds(host, "poll_oneoff"):
                return 0
            return self._poll(host, subs, events, count, nevents)

        linker.allow_shadowing = True
        for name, fn in (("fd_write", fd_write), ("fd_read", fd_read), ("poll_oneoff", poll_oneoff)):
            callback = _raw_callback(fn)
            self._callbacks.append(callback)  # alive as long as the linker's functions
            define_raw(linker, name, callback)
        if self._channels is not None:
            define_channels(linker, self._channels)
            self._define_channel_read(linker)  # shadows the one just defined

    def _define_channel_read(self, linker: wasmtime.Linker) -> None:
        channels = self._channels
        assert channels is not None
        i32 = wasmtime.ValType.i32

        def read(caller: wasmtime.Caller, handle: int, ptr: int, room: int, timeout_ms: int) -> int:
            host = _CallerHost(caller, self.memory)
            if self._unwinds(host, "channels.read"):
                return 0
            size = host.size()
            if ptr < 0 or room < 0 or ptr + room > size:
                return -EFAULT
            deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
            while True:
                left_ms = READ_SLICE_MS if deadline is None else min(READ_SLICE_MS, (deadline - time.monotonic()) * 1000)
                got = channels.read(handle, room, max(0, int(left_ms)))
                if got != -EAGAIN or (deadline is not None and time.monotonic() >= deadline):
                    break
                if self.stop.is_set():
                    return -ECANCELED
                if self._pause.is_set() and self._unwinds(host, "channels.read"):
                    return 0  # nothing was taken: the read is made again after the rewind
            if isinstance(got, int):
                return got
            ctypes.memmove(host.base() + ptr, got, len(got))
            return len(got)

        linker.define_func("channels", "read", wasmtime.FuncType([i32()] * 4, [i32()]), read, access_caller=True)

    # ----- sleeping ------------------------------------------------------------------------
    def _poll(self, host: _Host, subs: int, events: int, count: int, nevents: int) -> int:
        """Sleeping: clock subscriptions wait (the earliest wins); stdio ones are ready at once."""
        size = host.size()
        if count <= 0 or count > 64 or subs < 0 or subs + 48 * count > size or events < 0 \
                or events + 32 * count > size:
            return ERRNO_INVAL
        raw = ctypes.string_at(host.base() + subs, 48 * count)
        ready: list[bytes] = []
        sleep_ns, clock_userdata = None, 0
        for i in range(count):
            userdata, tag, clock_id, timeout, _precision, flags = _SUB.unpack_from(raw, 48 * i)
            if tag == 0:  # a clock
                if flags & 1:  # an absolute time
                    now = time.time_ns() if clock_id == 0 else time.monotonic_ns()
                    timeout = max(0, timeout - now)
                if sleep_ns is None or timeout < sleep_ns:
                    sleep_ns, clock_userdata = timeout, userdata
            else:  # fd_read (1) or fd_write (2): stdio is always ready
                _ud, _tag, fd = _FD_SUB.unpack_from(raw, 48 * i)
                error = 0 if fd in (0, 1, 2) else ERRNO_BADF
                ready.append(_EVENT.pack(userdata, error, tag, 0, 0))
        if not ready and sleep_ns is not None:
            if self._sleep_left_ns:  # the rest of a sleep a pause cut short
                sleep_ns, self._sleep_left_ns = min(sleep_ns, self._sleep_left_ns), 0
            if not self._sleep(host, sleep_ns):
                return 0  # paused mid-sleep: unwinding
            ready.append(_EVENT.pack(clock_userdata, 0, 0, 0, 0))
        elif not ready:
            return ERRNO_NOTSUP
        out = b"".join(ready)
        ctypes.memmove(host.base() + events, out, len(out))
        return _store_u32(host, nevents, len(ready))

    def _sleep(self, host: _Host, ns: int) -> bool:
        """Sleep `ns`; False when a pause cut it short (the module is unwinding)."""
        end = time.monotonic_ns() + ns
        while True:
            left = end - time.monotonic_ns()
            if left <= 0 or self.stop.is_set():
                return True
            self._wake.wait(left / 1e9)
            self._wake.clear()
            if self._pause.is_set() and not self.stop.is_set():
                left = max(0, end - time.monotonic_ns())
                if self._unwinds(host, "poll_oneoff"):
                    self._sleep_left_ns = left or 1
                    return False


# ----- what a host call sees of the module ------------------------------------------------------
class _Host(Protocol):
    def base(self) -> int: ...
    def size(self) -> int: ...
    def grow(self, pages: int) -> int | None: ...  # the old size in pages, or None when it cannot
    def call(self, export: bytes, *i32: int) -> None: ...


class _RawHost:
    """A raw host call's caller (wasmtime's C API), valid during the call."""

    __slots__ = ("caller", "context", "memory")

    def __init__(self, caller: Any, context: Any, memory: Any) -> None:
        self.caller, self.context, self.memory = caller, context, memory

    def base(self) -> int:
        return memory_base(self.context, self.memory) or 0

    def size(self) -> int:
        return memory_size(self.context, self.memory)

    def grow(self, pages: int) -> int | None:
        old = ctypes.c_uint64()
        error = ffi.wasmtime_memory_grow(self.context, self.memory, pages, ctypes.byref(old))
        if error:
            ffi.wasmtime_error_delete(error)
            return None
        return old.value

    def call(self, export: bytes, *i32: int) -> None:
        item = ffi.wasmtime_extern_t()
        if not caller_export_get(self.caller, export, len(export), ctypes.byref(item)) or item.kind != EXTERN_FUNC:
            raise RuntimeError(f"the module has no {export.decode()}")
        args = (ffi.wasmtime_val_t * max(1, len(i32)))()
        for i, value in enumerate(i32):
            args[i].kind = ffi.WASMTIME_I32.value
            args[i].of.i32 = value
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ffi.wasmtime_func_call(self.context, ctypes.byref(item.of.func), args, len(i32), None, 0,
                                       ctypes.byref(trap))
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        if trap:
            raise wasmtime.Trap._from_ptr(trap)


class _CallerHost:
    """A wasmtime-py host call's caller (a channel read)."""

    def __init__(self, caller: wasmtime.Caller, memory: wasmtime.Memory) -> None:
        self.caller, self.memory = caller, memory

    def base(self) -> int:
        return ctypes.addressof(self.memory.data_ptr(self.caller).contents)

    def size(self) -> int:
        return self.memory.data_len(self.caller)

    def grow(self, pages: int) -> int | None:
        try:
            return self.memory.grow(self.caller, pages)
        except wasmtime.WasmtimeError:
            return None

    def call(self, export: bytes, *i32: int) -> None:
        func = self.caller.get(export.decode())
        assert isinstance(func, wasmtime.Func)
        func(self.caller, *i32)


def _raw_callback(fn: Callable[..., int]) -> Any:
    """`fn(host, a, b, c, d) -> errno` as a raw WASI callback of four i32s."""

    def callback(_env: Any, caller: Any, args: Any, _n: int) -> int:
        try:
            item = ffi.wasmtime_extern_t()
            if not caller_export_get(caller, MEMORY_NAME, 6, ctypes.byref(item)) or item.kind != EXTERN_MEMORY:
                args[0].i32 = ERRNO_BADF
                return 0
            host = _RawHost(caller, caller_context(caller), ctypes.byref(item.of.memory))
            args[0].i32 = fn(host, *RAW_ARGS.unpack(ctypes.string_at(args, RAW_ARGS.size)))
        except Exception:  # never into wasmtime: the module gets an error number
            log.exception("host call failed")
            args[0].i32 = EFAULT
        return 0

    return ffi.wasmtime_func_unchecked_callback_t(callback)


def _gather(host: _Host, iovs: int, count: int) -> bytes | None:
    size, base = host.size(), host.base()
    if iovs < 0 or count < 0 or count > 1024 or iovs + 8 * count > size:
        return None
    fields = struct.unpack(f"<{2 * count}I", ctypes.string_at(base + iovs, 8 * count))
    out = bytearray()
    for ptr, length in zip(fields[::2], fields[1::2], strict=True):
        if ptr + length > size:
            return None
        out += ctypes.string_at(base + ptr, length)
    return bytes(out)


def _store_u32(host: _Host, ptr: int, value: int) -> int:
    if ptr < 0 or ptr + 4 > host.size():
        return EFAULT
    ctypes.memmove(host.base() + ptr, struct.pack("<I", value), 4)
    return 0
