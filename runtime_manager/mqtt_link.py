"""Run a paho-mqtt client's network I/O on an asyncio event loop.

Instead of paho's own network thread, the loop reads when the socket is
readable, writes when paho has something to send, and calls `loop_misc` once a
second for keepalives. Connecting (which blocks on a slow broker) happens on a
worker thread, with backoff, forever: the loop is never blocked and the node
never exits on a connection error. One thread for MQTT and flows means no
hand-over between threads per message, which measured cheaper (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("mq")


class MqttLink:
    def __init__(
        self, client: mqtt.Client, loop: asyncio.AbstractEventLoop, host: str, port: int, keepalive: int,
        connect_kwargs: dict[str, Any] | None = None, max_backoff_s: float = 10.0,
    ) -> None:
        self.client, self.loop = client, loop
        self.host, self.port, self.keepalive = host, port, keepalive
        self.connect_kwargs = connect_kwargs or {}
        self.max_backoff_s = max_backoff_s
        self._backoff = 0.0
        self._stopping = False
        self._loop_thread: int | None = None
        self._misc: asyncio.Task | None = None
        self._connecting = False
        client.on_socket_open = lambda _c, _u, sock: self._in_loop(self._watch, sock)
        client.on_socket_close = lambda _c, _u, sock: self._in_loop(self._unwatch, sock)
        client.on_socket_register_write = lambda _c, _u, sock: self._in_loop(self._want_write, sock)
        client.on_socket_unregister_write = lambda _c, _u, sock: self._in_loop(self._no_write, sock)

    # ----- lifecycle (any thread) ----------------------------------------------
    def start(self) -> None:
        self.loop.call_soon_threadsafe(self._begin)

    def stop(self, timeout: float = 3.0) -> None:
        """Disconnect cleanly (the DISCONNECT is written before the socket closes)."""
        done = threading.Event()

        def disconnect() -> None:
            self._stopping = True
            if self._misc is not None:
                self._misc.cancel()
            if self.client.is_connected():
                self.client.disconnect()
                self._flush_then(done.set)
            else:
                done.set()

        self.loop.call_soon_threadsafe(disconnect)
        done.wait(timeout)

    def _flush_then(self, then: Callable[[], None], tries: int = 100) -> None:
        if self.client.socket() is None or tries == 0:
            then()
        else:
            self.loop.call_later(0.01, self._flush_then, then, tries - 1)

    # ----- connecting (loop thread, the blocking part on a worker thread) ------------
    def _begin(self) -> None:
        self._loop_thread = threading.get_ident()
        self.client.connect_async(self.host, self.port, self.keepalive, **self.connect_kwargs)
        self._misc = self.loop.create_task(self._misc_loop())
        self.reconnect_later(0)

    def connected(self) -> None:
        """Call from on_connect: the next loss reconnects quickly again."""
        self._backoff = 0.0

    def reconnect_later(self, delay: float | None = None) -> None:
        """Call from on_disconnect (and at start): try again after a backoff."""
        if self._stopping or self._connecting:
            return
        if delay is None:
            self._backoff = min(self.max_backoff_s, max(0.5, self._backoff * 2))
            delay = self._backoff
        self._connecting = True
        self.loop.call_later(delay, lambda: self.loop.create_task(self._connect()))

    async def _connect(self) -> None:
        try:
            await self.loop.run_in_executor(None, self.client.reconnect)
        except (OSError, mqtt.WebsocketConnectionError) as exc:
            self._connecting = False
            self._backoff = min(self.max_backoff_s, max(0.5, self._backoff * 2))
            log.warning("broker %s:%d unreachable (%s); retrying in %.1f s", self.host, self.port, exc, self._backoff)
            self.reconnect_later(self._backoff)
            return
        self._connecting = False

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.client.socket() is not None:
                self.client.loop_misc()

    # ----- socket readiness (loop thread) ---------------------------------------
    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _watch(self, sock: Any) -> None:
        self.loop.add_reader(sock, self.client.loop_read)

    def _unwatch(self, sock: Any) -> None:
        for remove in (self.loop.remove_reader, self.loop.remove_writer):
            try:
                remove(sock)
            except (OSError, ValueError):
                pass

    def _want_write(self, sock: Any) -> None:
        try:
            self.loop.add_writer(sock, self.client.loop_write)
        except (OSError, ValueError):
            pass  # the socket closed meanwhile

    def _no_write(self, sock: Any) -> None:
        try:
            self.loop.remove_writer(sock)
        except (OSError, ValueError):
            pass
