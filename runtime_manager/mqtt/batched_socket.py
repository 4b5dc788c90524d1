"""The link's TCP socket as paho sees it: read in blocks, written in batches.

paho reads a packet with at least three `recv` calls (its first byte, each
byte of its length, the rest) and writes every packet with a `send` of its
own. In a burst that is four system calls for each request and its result,
and a wake-up of the broker for every result on its own. `BatchedSocket`
stands in for the socket: one `recv` takes what the kernel holds (up to
READ_SIZE) and paho's small reads are served from it; paho's sends are kept
and go out together when the link flushes, after each `loop_write` and
`loop_read` (one turn of the loop: every result made in that turn in one
segment).

Nothing is lost or reordered: bytes leave in the order paho wrote them, a
flush that the kernel cannot take whole keeps the rest for the next one (the
link then waits for the socket to be writable), and closing sends what it
can first. When MAX_UNSENT bytes wait, `send` says "would block" as a full
socket does, and paho keeps its packets queued. Everything else (`fileno`,
`setsockopt`, `close` ...) is the socket's own. Only plain TCP sockets are
wrapped; a TLS socket does its own buffering (`pending`).
"""

from __future__ import annotations

import socket
from typing import Any

from .publish_codec import Message, read_publish

READ_SIZE = 65536
MAX_UNSENT = 1 << 20


class BatchedSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._in = b""  # received, not yet given to paho: self._in[self._at:]
        self._at = 0
        self._out = bytearray()  # written by paho, not yet sent

    # ----- what paho calls -------------------------------------------------------------
    def recv(self, size: int) -> bytes:
        """Up to `size` bytes: from what was received before, else from the
        socket (BlockingIOError when it has nothing, b"" when it is closed)."""
        if self._at >= len(self._in):
            data = self.sock.recv(READ_SIZE)
            if len(data) <= size:
                return data
            self._in, self._at = data, 0
        start = self._at
        self._at = min(start + size, len(self._in))
        return self._in[start:self._at]

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Keep `data` for the next flush; all of it is taken, or none (BlockingIOError)."""
        if len(self._out) >= MAX_UNSENT:
            self.flush()
            if len(self._out) >= MAX_UNSENT:
                raise BlockingIOError("unsent bytes at their limit")
        self._out += data
        return len(data)

    def pending(self) -> int:
        """Bytes received and not yet read: whole packets, or the start of one
        (paho reads a packet to its end, or the buffer empty)."""
        return len(self._in) - self._at

    def next_is_qos0_publish(self) -> bool:
        """Whether the received bytes not yet read start with a QoS 0 PUBLISH
        (meaningful only where a packet starts: paho not half-way through one)."""
        return self._at < len(self._in) and self._in[self._at] & 0xF6 == 0x30

    def close(self) -> None:
        try:
            self.flush()  # a DISCONNECT paho wrote just before closing, say
        except OSError:
            pass
        finally:
            self._out.clear()
            self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    # ----- what the link calls ---------------------------------------------------------
    def take_publish(self, v5: bool) -> Message | None:
        """The PUBLISH at the front of what was received, when `read_publish` reads
        it (the socket is read first when nothing is left); None otherwise, and
        nothing is consumed: paho reads that packet. (An end of stream or an error
        met here is met again by paho's own `recv`.)"""
        if self._at >= len(self._in):
            try:
                data = self.sock.recv(READ_SIZE)
            except OSError:
                return None
            self._in, self._at = data, 0
        read = read_publish(self._in, self._at, v5)
        if read is None:
            return None
        message, self._at = read
        return message

    def flush(self) -> bool:
        """Send what paho wrote, as much as the socket takes now. True when
        nothing is left; OSError when the connection is gone."""
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return False
            del self._out[:sent]
        return True

    @property
    def unsent(self) -> int:
        return len(self._out)
