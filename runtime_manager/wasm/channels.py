"""Channels: the message topics an orchestrator module may use, as the module sees them.

A module names a channel by its `path` and calls four functions it imports
from the `channels` import module (all i32):

    open(path_ptr, path_len) -> handle, or -errno
    read(handle, buf_ptr, buf_len, timeout_ms) -> the next message's length, or -errno
    write(handle, ptr, len) -> 0, or -errno
    close(handle) -> 0, or -errno

`read` waits up to `timeout_ms` (< 0: until a message comes or the module is
stopped) and copies the next message into the buffer. A message longer than
`buf_len` is not taken: the call returns its length and the module can ask
again with a larger buffer. Each `write` is one message. Errors are negated
WASI errno values:

    ENOENT (44)  no channel has that path
    EBADF (8)    not an open handle
    EACCES (2)   the channel's mode does not allow it (read on `w`, write on `r`)
    EAGAIN (6)   nothing came within timeout_ms; or too many writes still on their way
    EMSGSIZE (35) a message larger than MAX_MESSAGE
    EFAULT (21)  a pointer outside the module's memory
    ECANCELED (11) the module is being stopped

Buffers are bounded: each readable channel keeps at most MAX_QUEUED messages
(MAX_QUEUED_BYTES), dropping the oldest (counted); at most MAX_PENDING writes
of a module wait for the broker. This module knows nothing of MQTT: the
orchestrator runtime delivers messages (`deliver`) and takes writes (`send`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import wasmtime

log = logging.getLogger("orch")

EACCES, EAGAIN, EBADF, ECANCELED, EFAULT, EMSGSIZE, ENOENT = 2, 6, 8, 11, 21, 35, 44
MAX_MESSAGE = 1024 * 1024
MAX_QUEUED = 64
MAX_QUEUED_BYTES = 1024 * 1024
MAX_PENDING = 64
MAX_HANDLES = 64


@dataclass(frozen=True)
class Channel:
    path: str  # what the module opens
    topic: str  # where its messages travel
    mode: str  # "r", "w" or "rw"

    @property
    def readable(self) -> bool:
        return "r" in self.mode

    @property
    def writable(self) -> bool:
        return "w" in self.mode

    def as_message(self) -> dict[str, object]:
        """As a create carries it (both dialects' keys: Silverline `topic`, ARTS `params.topic`)."""
        return {"path": self.path, "mode": self.mode, "topic": self.topic, "type": "pubsub",
                "params": {"topic": self.topic}}


Send = Callable[[Channel, bytes, Callable[[], None]], None]  # (channel, payload, call when it is gone)


@dataclass
class _Inbox:
    messages: collections.deque[bytes] = field(default_factory=collections.deque)
    size: int = 0
    dropped: int = 0
    own: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=256))  # digests of our writes


class ModuleChannels:
    """One module's channels: an inbox per readable channel, the handles it opened,
    and its writes on their way. `deliver` runs on the node's loop; `open`, `read`,
    `write` and `close` on the module's thread."""

    def __init__(self, channels: list[Channel], send: Send, module: str = "module") -> None:
        self.channels = {c.path: c for c in channels}
        self.module = module
        self._send = send
        self._cond = threading.Condition()
        self._inbox = {c.path: _Inbox() for c in channels if c.readable}
        self._handles: dict[int, Channel] = {}
        self._pending = 0
        self._cancelled = False
        self.received = self.sent = 0

    # ----- the node's side -------------------------------------------------------
    def readers(self) -> list[Channel]:
        return [c for c in self.channels.values() if c.readable]

    def deliver(self, channel: Channel, payload: bytes) -> None:
        """A message on a readable channel's topic. A module's own write on an `rw`
        channel comes back from the broker: it is not delivered to itself."""
        with self._cond:
            box = self._inbox.get(channel.path)
            if box is None:
                return
            if channel.writable:
                digest = hashlib.blake2b(payload, digest_size=16).digest()
                if digest in box.own:
                    box.own.remove(digest)
                    return
            box.messages.append(payload)
            box.size += len(payload)
            while len(box.messages) > MAX_QUEUED or box.size > MAX_QUEUED_BYTES:
                box.size -= len(box.messages.popleft())
                box.dropped += 1
                if box.dropped == 1 or box.dropped % 100 == 0:
                    log.warning("module %s, channel %s: inbox full (%d messages, %d bytes), oldest dropped (%d so far)",
                                self.module, channel.path, MAX_QUEUED, MAX_QUEUED_BYTES, box.dropped)
            self.received += 1
            self._cond.notify_all()

    def cancel(self) -> None:
        """The module is being stopped: a waiting `read` returns at once."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def begin_run(self) -> None:
        """Each run (repeat, restart) opens its channels anew; inboxes are kept."""
        with self._cond:
            self._handles.clear()

    def snapshot(self) -> dict[str, object]:
        """What travels with a paused module: its open handles and the messages
        waiting in its inboxes (base64 would cost more than hex is worth here: hex)."""
        with self._cond:
            return {"handles": {str(h): c.path for h, c in self._handles.items()},
                    "inbox": {path: [m.hex() for m in box.messages] for path, box in self._inbox.items()}}

    def restore(self, state: dict[str, object]) -> None:
        """Handles and inboxes from `snapshot` (of a module with the same channels)."""
        handles = state.get("handles") if isinstance(state.get("handles"), dict) else {}
        inbox = state.get("inbox") if isinstance(state.get("inbox"), dict) else {}
        with self._cond:
            self._handles = {int(h): self.channels[p] for h, p in handles.items()  # type: ignore[union-attr]
                             if isinstance(p, str) and p in self.channels and str(h).isdigit()}
            for path, messages in inbox.items():  # type: ignore[union-attr]
                box = self._inbox.get(path)
                if box is None or not isinstance(messages, list):
                    continue
                for text in messages[-MAX_QUEUED:]:
                    try:
                        message = bytes.fromhex(text)
                    except (TypeError, ValueError):
                        continue
                    box.messages.append(message)
                    box.size += len(message)

    def dropped(self) -> int:
        with self._cond:
            return sum(b.dropped for b in self._inbox.values())

    # ----- the module's side ----------------------------------------------------------
    def open(self, path: str) -> int:
        channel = self.channels.get(path)
        if channel is None:
            return -ENOENT
        with self._cond:
            if len(self._handles) >= MAX_HANDLES:
                return -EAGAIN
            handle = next(h for h in range(3, 3 + MAX_HANDLES + 1) if h not in self._handles)
            self._handles[handle] = channel
            return handle

    def close(self, handle: int) -> int:
        with self._cond:
            return 0 if self._handles.pop(handle, None) is not None else -EBADF

    def read(self, handle: int, room: int, timeout_ms: int) -> bytes | int:
        """The next message (taken when it fits in `room`), its length when it does
        not, or -errno."""
        with self._cond:
            channel = self._handles.get(handle)
            if channel is None:
                return -EBADF
            if not channel.readable:
                return -EACCES
            box = self._inbox[channel.path]
            deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
            while not box.messages and not self._cancelled:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return -EAGAIN
                self._cond.wait(left)
            if self._cancelled:
                return -ECANCELED
            if len(box.messages[0]) > room:
                return len(box.messages[0])
            message = box.messages.popleft()
            box.size -= len(message)
            return message

    def write(self, handle: int, payload: bytes) -> int:
        with self._cond:
            channel = self._handles.get(handle)
            if channel is None:
                return -EBADF
            if not channel.writable:
                return -EACCES
            if self._cancelled:
                return -ECANCELED
            if len(payload) > MAX_MESSAGE:
                return -EMSGSIZE
            if self._pending >= MAX_PENDING:
                return -EAGAIN
            self._pending += 1
            if channel.readable:
                self._inbox[channel.path].own.append(hashlib.blake2b(payload, digest_size=16).digest())
            self.sent += 1
        self._send(channel, payload, self._gone)
        return 0

    def _gone(self) -> None:
        with self._cond:
            self._pending -= 1


# ----- the functions a module imports --------------------------------------------------
def _memory(caller: wasmtime.Caller) -> wasmtime.Memory | None:
    memory = caller.get("memory")
    return memory if isinstance(memory, wasmtime.Memory) else None


def _bytes(caller: wasmtime.Caller, ptr: int, length: int) -> bytes | None:
    memory = _memory(caller)
    if memory is None or ptr < 0 or length < 0 or ptr + length > memory.data_len(caller):
        return None
    return bytes(memory.read(caller, ptr, ptr + length))


def define(linker: wasmtime.Linker, channels: ModuleChannels) -> None:
    """Define `channels.open/read/write/close` in `linker`, bound to one module's channels."""
    i32 = wasmtime.ValType.i32

    def open_(caller: wasmtime.Caller, ptr: int, length: int) -> int:
        raw = _bytes(caller, ptr, min(length, 4096))
        if raw is None:
            return -EFAULT
        return channels.open(raw.decode("utf-8", "replace"))

    def read(caller: wasmtime.Caller, handle: int, ptr: int, room: int, timeout_ms: int) -> int:
        memory = _memory(caller)
        if memory is None or ptr < 0 or room < 0 or ptr + room > memory.data_len(caller):
            return -EFAULT
        got = channels.read(handle, room, timeout_ms)
        if isinstance(got, int):
            return got
        memory.write(caller, got, ptr)
        return len(got)

    def write(caller: wasmtime.Caller, handle: int, ptr: int, length: int) -> int:
        if length > MAX_MESSAGE:
            return -EMSGSIZE
        payload = _bytes(caller, ptr, length)
        if payload is None:
            return -EFAULT
        return channels.write(handle, payload)

    def close(_caller: wasmtime.Caller, handle: int) -> int:
        return channels.close(handle)

    for name, fn, params in (("open", open_, 2), ("read", read, 4), ("write", write, 3), ("close", close, 1)):
        linker.define_func("channels", name, wasmtime.FuncType([i32() for _ in range(params)], [i32()]), fn,
                           access_caller=True)
