"""The process's one MQTT connection, driven by the node's event loop.

`MqttLink` owns a paho-mqtt client and everything about its connection: the
client's settings (MQTT version, persistent session, credentials, TLS, will),
connecting and reconnecting with backoff, the subscriptions (made again on
every connection), which handler gets which message, and which publishes the
broker has not yet acknowledged. Every part of a node that speaks MQTT (the
MQTT entry point, the orchestrator runtime) uses the same link; the tools use
`make_client`, so credentials, TLS and MQTT 5 properties are set in one place.

paho's network I/O runs on the loop, not on a thread of paho's: the loop reads
when the socket is readable, writes when paho has something to send, and calls
`loop_misc` for keepalives. Connecting (which blocks on a slow broker) runs on
a worker thread. Failure boundaries: an exception in `loop_read`, `loop_write`
or `loop_misc` drops the connection and reconnects; an exception in a handler
is logged and its message acknowledged; an exception in a connection attempt
(even a bad host) is logged and tried again after a backoff, forever, until
the link is stopped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import MqttConfig
from ..core.lifecycle import Service, wait_until
from ..core.topics import topic_name_problem
from .batched_socket import BatchedSocket
from .paho_tables import speed_up as build_paho_tables_once
from .publish_codec import puback_packet, publish_packet

log = logging.getLogger("mq")
READS_PER_TURN = 64  # packets read from bytes already received in one turn of the loop, at most
MQTT_MAX_PACKET = 268_435_455  # the protocol's limit on a packet
INFLIGHT = 100  # QoS 1/2 publishes sent and not yet acknowledged, at most (more wait in paho's queue)

Handler = Callable[[mqtt.MQTTMessage], None]


def make_client(cfg: MqttConfig, client_id: str, receive_maximum: int | None = None,
                persistent: bool = True) -> tuple[mqtt.Client, dict[str, Any]]:
    """A paho 2.x client (MQTT 5 unless comm.conf says "protocol": "3.1.1") with
    credentials and TLS from comm.conf; `persistent`: the broker keeps the session
    (and unacknowledged messages) while the client is away. Returns the client and
    the keyword arguments for `connect`/`connect_async`."""
    build_paho_tables_once()  # paho_tables.py
    connect: dict[str, Any] = {}
    if cfg.protocol == "3.1.1":
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
                             protocol=mqtt.MQTTv311)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = cfg.session_expiry_s
        if receive_maximum:
            props.ReceiveMaximum = max(1, min(receive_maximum, 65535))
        connect = {"clean_start": not persistent, "properties": props}
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.tls is not None:
        client.tls_set(ca_certs=cfg.tls.get("ca_certs"), certfile=cfg.tls.get("certfile"), keyfile=cfg.tls.get("keyfile"))
        if cfg.tls.get("insecure"):
            client.tls_insecure_set(True)
    # Publishes waiting for the broker's PUBACK. paho rescans its in-flight list on
    # every PUBACK, so a huge window costs CPU; 100 keeps a loopback link full.
    client.max_inflight_messages_set(INFLIGHT)
    client.max_queued_messages_set(0)
    return client, connect


@dataclass
class Subscription:
    match: str  # the topic filter messages are matched against
    broker_filter: str  # what is sent to the broker (`$share/<group>/<match>` for a shared one)
    qos: int
    handler: Handler
    acks: bool  # True: the handler acknowledges QoS 1/2 messages itself (`MqttLink.ack`)


class MqttLink(Service):
    """A service of the node (core/lifecycle.py), a dependency of the entry
    points, membership and the orchestrator runtime: set up and started before
    them, stopped after them (pending publishes first)."""

    name = "mqtt link"
    CONNACK_TIMEOUT_S = 10.0

    def __init__(self, cfg: MqttConfig, client_id: str, receive_maximum: int | None = None,
                 max_backoff_s: float = 10.0, persistent: bool = True, name: str = "mqtt link",
                 once: bool = False) -> None:
        self.cfg = cfg
        self.once = once  # one connection only: when it drops, the link does not connect again
        self.name = name
        self.client_id = client_id
        self.client, self._connect_kwargs = make_client(cfg, client_id, receive_maximum, persistent)
        self.client.manual_ack_set(True)  # acknowledged after the handler (or by it)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = lambda _c, _u, sock: self._in_loop(self._unwatch, sock)
        self.client.on_socket_register_write = lambda _c, _u, sock: self._in_loop(self._want_write, sock)
        self.client.on_socket_unregister_write = lambda _c, _u, sock: self._in_loop(self._no_write, sock)
        self.max_backoff_s = max_backoff_s
        self._fds: dict[int, int] = {}  # id(socket) -> its descriptor, kept while watched
        self._holding = False  # its readable event held while received bytes wait (`_read`)
        self._writer_on = False  # the loop watches the socket for writability
        self._write_soon = False  # a write is due at the end of this turn of the loop
        self.read_more: Callable[[], bool] = lambda: True  # read another received packet in this turn? (`_read`)
        self._subs: list[Subscription] = []
        self._exact: dict[str, Subscription] = {}
        self._on_connected: list[Callable[[], None]] = []
        self._unacked: dict[int, Callable[[bool], None] | None] = {}  # QoS 1/2 publishes paho sent, without PUBACK yet
        # QoS 1/2 publishes waiting for room among those (`_send_held`)
        self._held: collections.deque[tuple[str, bytes, int, bool, Callable[[bool], None] | None, Properties | None]] = \
            collections.deque()
        self.max_packet_bytes = MQTT_MAX_PACKET  # the broker's, from its CONNACK (MQTT 5)
        self._v5 = cfg.protocol != "3.1.1"
        # PUBLISH packets of the hot path read and written here instead of by paho
        # (publish_codec.py), when paho has the state this was written for
        self.own_packets = _paho_state_known(self.client)
        self.packets_read = self.packets_written = 0  # ... how many so far
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tasks: list[asyncio.Task] = []
        self._up: asyncio.Event | None = None
        self._down: asyncio.Event | None = None
        self._stopping = False
        self.connected = False
        self.connections = 0
        self.last_error: str | None = None

    # ----- configuration, before start ------------------------------------------
    def subscribe(self, topic: str, handler: Handler, qos: int = 1, *, shared_group: str | None = None,
                  acks: bool = False) -> None:
        """Deliver messages matching `topic` to `handler` (on the loop). Subscribed
        on every (re)connection. With `acks`, the handler calls `ack` itself."""
        broker_filter = f"$share/{shared_group}/{topic}" if shared_group else topic
        sub = Subscription(topic, broker_filter, qos, handler, acks)
        self._subs.append(sub)
        if "+" not in topic and "#" not in topic:
            self._exact[topic] = sub
        if self.connected:
            self._in_loop(lambda: self.client.subscribe(broker_filter, qos=qos))

    def listens_to(self, topic: str) -> bool:
        """Whether a message on `topic` would reach one of the subscriptions."""
        return any(mqtt.topic_matches_sub(s.match, topic) for s in self._subs)

    def unsubscribe(self, topic: str) -> None:
        """Stop delivering `topic` (as given to `subscribe`, without a shared group)."""
        self._subs = [s for s in self._subs if s.match != topic or s.broker_filter != topic]
        self._exact.pop(topic, None)
        if self.connected:
            self._in_loop(lambda: self.client.unsubscribe(topic))

    def leave(self, topic: str) -> None:
        """Unsubscribe `topic` at the broker (so it sends no more) but keep its
        handler: what the broker sent before it heard is still handled (on the loop)."""
        for sub in self._subs:
            if sub.match == topic and self.connected:
                self.client.unsubscribe(sub.broker_filter)

    def will(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """The message the broker publishes when this process vanishes (before start)."""
        self.client.will_set(topic, payload, qos=qos, retain=retain)

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) after each connection, once subscriptions are sent."""
        self._on_connected.append(callback)

    # ----- lifecycle (on the loop) ---------------------------------------------------
    async def setup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._up, self._down = asyncio.Event(), asyncio.Event()

    async def start(self) -> None:
        assert self.loop is not None
        log.info("%s connecting to %s:%d as '%s'", self.name, self.cfg.host, self.cfg.port, self.client_id)
        self._tasks = [self.loop.create_task(self._keep_connected(), name="mqtt-connect"),
                       self.loop.create_task(self._misc(), name="mqtt-keepalive")]

    async def wait_connected(self, timeout: float) -> bool:
        assert self._up is not None
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self, timeout: float = 5.0, end_session: bool = False) -> None:
        """Wait (bounded) until the broker has acknowledged every publish, then
        disconnect cleanly (the DISCONNECT is written before the socket closes, so
        the broker does not publish the will). `end_session` (MQTT 5): the
        DISCONNECT sets the session's expiry to 0, so the broker drops the session
        and what it still held for it."""
        deadline = time.monotonic() + timeout
        await wait_until(lambda: not (self.unacked and self.connected), timeout)
        if self.unacked:
            log.warning("%d publishes not acknowledged by the broker at stop", self.unacked)
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self.client.socket() is not None:
            try:
                if end_session and self.cfg.protocol != "3.1.1":
                    props = Properties(PacketTypes.DISCONNECT)
                    props.SessionExpiryInterval = 0
                    self.client.disconnect(properties=props)
                else:
                    self.client.disconnect()
            except Exception:
                log.exception("disconnect failed")
            await wait_until(lambda: self.client.socket() is None, max(0.0, deadline + 1 - time.monotonic()))
        self.connected = False

    def kill(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        sock = self.client.socket()
        if sock is not None:
            try:
                self._unwatch(sock)
                sock.close()
            except Exception:
                pass
        self.connected = False

    # ----- publishing and acknowledging (on the loop) ---------------------------------------
    def fits(self, topic: str, payload: bytes) -> bool:
        """Whether a publish of `payload` on `topic` fits in one packet the broker takes."""
        return len(payload) + len(topic.encode()) + 16 <= self.max_packet_bytes

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                on_acked: Callable[[bool], None] | None = None, properties: Properties | None = None,
                correlation: bytes | None = None) -> None:
        """Publish; `on_acked(accepted)` runs once the broker has answered (PUBACK
        for QoS 1/2: False when its reason code is a failure; at once for QoS 0).
        `correlation`: the MQTT 5 Correlation Data property (without `properties`).
        While disconnected QoS 1/2 publishes wait in paho and go out on the next
        connection. Raises ValueError for a topic or payload MQTT cannot carry (a
        topic the broker would take for a malformed packet, or a packet larger than
        its Maximum Packet Size, never leaves: sent at QoS 1, it would come back
        after every reconnect and drop the link again)."""
        problem = topic_name_problem(topic)
        if problem:
            raise ValueError(f"cannot publish on topic {topic[:80]!r}: it {problem}")
        if not self.fits(topic, payload):  # the broker would drop the link for it, again after every reconnect
            raise ValueError(f"cannot publish {len(payload)} bytes on topic {topic[:80]!r}: larger than the broker "
                             f"takes ({self.max_packet_bytes} bytes)")
        if qos == 0 and properties is None and self._write_own(
                publish_packet, topic, payload, self._v5, correlation if self._v5 else None, retain):
            if on_acked is not None:
                on_acked(True)
            return
        if correlation is not None and self._v5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        if qos > 0 and (self._held or len(self._unacked) >= INFLIGHT):
            # paho's window is full: it would queue this one, and walk its whole queue
            # on every PUBACK (with thousands queued, slower than the broker's acknowledgements)
            self._held.append((topic, payload, qos, retain, on_acked, properties))
            return
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0:
            self._unacked[info.mid] = on_acked
        elif on_acked is not None:
            on_acked(True)

    def _send_held(self) -> None:
        """Hand paho the held QoS 1/2 publishes there is room for, in order."""
        while self._held and len(self._unacked) < INFLIGHT:
            topic, payload, qos, retain, on_acked, properties = self._held.popleft()
            try:
                info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            except Exception as exc:
                log.error("a held publish on %r could not be sent: %s", topic[:80], exc)
                if on_acked is not None:
                    on_acked(False)
                continue
            self._unacked[info.mid] = on_acked

    def _write_own(self, packet: Callable[..., bytes], *args: Any) -> bool:
        """`packet(*args)` (publish_codec.py) written straight into the batched
        socket, to leave at the end of this turn of the loop; False: paho is to
        write it (not connected, not a batched socket, or paho has packets of its
        own waiting, which must leave first)."""
        sock = self.client._sock
        if not (self.own_packets and self.connected and type(sock) is BatchedSocket) or self.client._out_packet:
            return False
        try:
            sock.send(packet(*args))
        except BlockingIOError:  # a megabyte waits for the kernel already: paho queues it
            return False
        self.packets_written += 1
        if not self._write_soon:
            self._write_soon = True
            assert self.loop is not None
            self.loop.call_soon(self._write)
        return True

    def publish_threadsafe(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """`publish` from another thread (a module's output, say)."""
        def publish() -> None:
            try:
                self.publish(topic, payload, qos, retain)
            except Exception as exc:
                log.error("publish on %r failed: %s", topic[:80], exc)

        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(publish)
            except RuntimeError:
                pass  # the loop closed: the node is stopping

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a QoS 1/2 message the handler took (`subscribe(acks=True)`)."""
        if qos == 1 and self._write_own(puback_packet, mid):
            return
        if qos > 0:
            self.client.ack(mid, qos)

    @property
    def unacked(self) -> int:
        """QoS 1/2 publishes the broker has not acknowledged yet (held ones included)."""
        return len(self._unacked) + len(self._held)

    # ----- paho callbacks (on the loop) ------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.error("%s", self.last_error)
            return
        self.max_packet_bytes = getattr(props, "MaximumPacketSize", None) or MQTT_MAX_PACKET
        self.connected = True
        self.connections += 1
        self.last_error = None
        set_nodelay(client)
        topics = ", ".join(f"'{s.broker_filter}'" for s in self._subs) or "nothing"
        if self.name == "mqtt link":
            log.info("connected (session present: %s); subscribing to %s", flags.session_present, topics)
        else:
            log.info("%s up, listening to %s", self.name, topics)
        for sub in self._subs:
            client.subscribe(sub.broker_filter, qos=sub.qos)
        assert self._up is not None
        self._up.set()
        for callback in self._on_connected:
            try:
                callback()
            except Exception:
                log.exception("a connection listener failed")

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self.connected
        self._lost(f"disconnected from broker ({reason})" if was else None)

    def _lost(self, why: str | None) -> None:
        self.connected = False
        if self._up is not None:
            self._up.clear()
        if self._down is not None:
            self._down.set()
        if why and not self._stopping:
            self.last_error = why
            log.warning("%s; reconnecting", why)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        sub = self._exact.get(msg.topic)
        if sub is None:
            sub = next((s for s in self._subs if mqtt.topic_matches_sub(s.match, msg.topic)), None)
        if sub is None:
            log.debug("message on '%s' matches no subscription; acknowledged and dropped", msg.topic)
            self.ack(msg.mid, msg.qos)
            return
        try:
            sub.handler(msg)
        except Exception:
            log.exception("handler of '%s' failed on a message; acknowledged, the link goes on", sub.match)
            self.ack(msg.mid, msg.qos)
            return
        if not sub.acks:
            self.ack(msg.mid, msg.qos)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        callback = self._unacked.pop(mid, None)
        if self._held:
            self._send_held()
        accepted = not getattr(reason, "is_failure", False)
        if not accepted:
            log.warning("the broker refused publish %d: %s", mid, reason)
        if callback is not None:
            try:
                callback(accepted)
            except Exception:
                log.exception("a publish acknowledgement callback failed")

    # ----- connecting -------------------------------------------------------------------
    async def _keep_connected(self) -> None:
        """Connect, wait for the connection to drop, connect again: forever, with
        backoff, whatever a connection attempt raises."""
        assert self.loop is not None and self._down is not None and self._up is not None
        backoff = 0.0
        while not self._stopping:
            try:
                self._down.clear()
                await self.loop.run_in_executor(None, self._connect_blocking)
                if not await self.wait_connected(self.CONNACK_TIMEOUT_S) and not self._down.is_set():
                    self._drop(f"no CONNACK from the broker within {self.CONNACK_TIMEOUT_S:.0f} s")
                if self._up.is_set():
                    backoff = 0.0
                await self._down.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("broker %s:%d unreachable (%s)", self.cfg.host, self.cfg.port, self.last_error)
            if self._stopping or (self.once and self.connections):
                self.connected = False
                return
            backoff = min(self.max_backoff_s, max(0.5, backoff * 2)) if backoff or not self.connections else 0.1
            log.debug("next connection attempt in %.1f s", backoff)
            await asyncio.sleep(backoff)

    def _connect_blocking(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive, **self._connect_kwargs)
        self.client.reconnect()

    def _drop(self, why: str) -> None:
        """Give the connection up (the next attempt closes its socket)."""
        sock = self.client.socket()
        if sock is not None:
            self._unwatch(sock)
        self._lost(why)

    async def _misc(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.client.socket() is not None:
                    self.client.loop_misc()
            except Exception as exc:
                log.exception("keepalive handling failed")
                self._drop(f"keepalive handling failed ({type(exc).__name__})")

    # ----- socket readiness (on the loop) ------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        """A new connection's socket (on the connecting thread, before paho sends
        anything on it): a plain TCP socket is read and written through a
        `BatchedSocket`. paho offers no way to give it a socket of one's own
        making, so the wrapper takes the place of the one it made (`_sock`,
        paho 2.2, pinned in requirements.txt; test_mqtt_link checks it is used)."""
        if type(sock) is socket.socket:
            sock = client._sock = BatchedSocket(sock)
        self._in_loop(self._watch, sock)

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread or self.loop is None:
            fn(*args)
        elif not self.loop.is_closed():  # closed: the node is gone, and the socket with it (paho's __del__)
            self.loop.call_soon_threadsafe(fn, *args)

    def _read(self) -> None:
        """Read what the broker sent. Bytes already received (a `BatchedSocket`'s
        block, a TLS socket's decoded records) raise no readable event: while
        there are some, the socket's readable event is held and reading goes on
        in the next turn of the loop. Within a turn, QoS 0 messages are read
        while `read_more()` says so (the MQTT entry point: while the engine has
        little waiting; at most READS_PER_TURN packets), otherwise one a turn:
        they are taken in at the pace the loop works them through. Other packets
        are read on (`_paced_next`)."""
        try:
            sock = self.client.socket()
            own = self.own_packets and self.connected and type(sock) is BatchedSocket
            read = self._read_packet(sock, own)
            pending = getattr(sock, "pending", None)
            if pending is not None:
                for _ in range(READS_PER_TURN):
                    if pending() <= 0 or self.client._sock is not sock:
                        break  # (the last: the connection ended meanwhile, what it still held goes with it)
                    if not self.read_more() and (not own or self._paced_next(sock)):
                        break
                    read += self._read_packet(sock, own)
            if read:  # what paho's keepalive looks at
                with self.client._msgtime_mutex:
                    self.client._last_bytes_received = time.monotonic()
            held = pending is not None and pending() > 0
            if held != self._holding:
                self._hold_readable(sock, held)
            if held and self.loop is not None:
                self.loop.call_soon(self._read)
            self._flush()  # what paho wrote while reading (acknowledgements; after a CONNACK, its queue)
        except Exception as exc:
            log.exception("reading from the broker failed")
            self._drop(f"read failed ({type(exc).__name__}: {exc})")

    def _paced_next(self, sock: BatchedSocket) -> bool:
        """Whether the next packet is one read at `read_more()`'s pace: a QoS 0
        PUBLISH. The broker sends no more QoS 1/2 ones than the link's Receive
        Maximum before they are acknowledged, and acknowledgements free what waits
        for them; both are read on (the broker's acknowledgements of results come
        behind the requests it sent before: holding those back held results)."""
        return not self.client._in_packet["command"] and sock.next_is_qos0_publish()

    def _read_packet(self, sock: Any, own: bool) -> int:
        """Read one packet: a PUBLISH of the hot path here (1), anything else by
        paho (0). (paho's `loop_read` reads as many packets as it has messages in
        flight, up to 100 with QoS 1 traffic: here it is asked for one.)"""
        client = self.client
        if not own:
            client.loop_read()
            return 0
        if client._sock is not sock:
            return 0  # the connection ended while reading
        if not client._in_packet["command"]:  # paho is not half-way through a packet
            message = sock.take_publish(self._v5)
            if message is not None:
                self.packets_read += 1
                self._on_message(client, None, message)
                return 1
        rc = client._packet_read()
        if rc > 0:
            client._loop_rc_handle(rc)
        return 0

    def _hold_readable(self, sock: Any, held: bool) -> None:
        assert self.loop is not None
        fd = self._fds.get(id(sock))
        if fd is None:
            return
        self._holding = held
        try:
            if held:
                self.loop.remove_reader(fd)
            else:
                self.loop.add_reader(fd, self._read)
        except (OSError, ValueError, RuntimeError):
            pass  # the socket closed meanwhile

    def _write(self) -> None:
        self._write_soon = False
        try:
            self.client.loop_write()
            self._flush()
        except Exception as exc:
            log.exception("writing to the broker failed")
            self._drop(f"write failed ({type(exc).__name__}: {exc})")

    def _flush(self) -> None:
        """Send what paho wrote into a `BatchedSocket`; what the socket does not
        take now goes when it is writable (the loop watches for that until then)."""
        sock = self.client.socket()
        if not isinstance(sock, BatchedSocket) or not sock.unsent:
            return
        if sock.flush():
            if self._writer_on and not self.client.want_write():
                self._no_write(sock)
        else:
            self._watch_writable(sock)

    # A socket is unwatched by the descriptor it had when watched: paho may have
    # closed it by then (on a worker thread, reconnecting), and a new socket may
    # already have the same number.
    def _watch(self, sock: Any) -> None:
        assert self.loop is not None
        try:
            fd = sock.fileno()
            self.loop.add_reader(fd, self._read)
            self._fds[id(sock)] = fd
            self._holding = self._writer_on = False
        except (OSError, ValueError, RuntimeError):
            log.debug("socket closed before it was watched")

    def _unwatch(self, sock: Any) -> None:
        assert self.loop is not None
        fd = self._fds.pop(id(sock), None)
        if fd is None:
            return
        self._writer_on = False
        for remove in (self.loop.remove_reader, self.loop.remove_writer):
            try:
                remove(fd)
            except (OSError, ValueError, RuntimeError):
                pass

    def _want_write(self, sock: Any) -> None:
        """paho has packets to write. Into a `BatchedSocket` with nothing
        waiting for the kernel: at the end of this turn of the loop (the socket
        takes them; watching it for writability would cost two system calls a
        turn and a turn of waiting). Otherwise: when the socket is writable."""
        assert self.loop is not None
        if self._fds.get(id(sock)) is None or sock is not self.client.socket():
            return  # not (or no longer) the link's socket
        if isinstance(sock, BatchedSocket) and not sock.unsent:
            if not self._write_soon:
                self._write_soon = True
                self.loop.call_soon(self._write)
            return
        self._watch_writable(sock)

    def _watch_writable(self, sock: Any) -> None:
        assert self.loop is not None
        fd = self._fds.get(id(sock))
        if fd is None or sock is not self.client.socket():
            return
        try:
            self.loop.add_writer(fd, self._write)
            self._writer_on = True
        except (OSError, ValueError, RuntimeError):
            pass  # the socket closed meanwhile

    def _no_write(self, sock: Any) -> None:
        assert self.loop is not None
        fd = self._fds.get(id(sock))
        if fd is None or not self._writer_on or (isinstance(sock, BatchedSocket) and sock.unsent
                                                  and sock is self.client.socket()):
            return  # not watched for writing, or bytes still wait for the socket
        try:
            self.loop.remove_writer(fd)
            self._writer_on = False
        except (OSError, ValueError, RuntimeError):
            pass


def set_nodelay(client: mqtt.Client) -> None:
    """Requests, results and acknowledgements are small: send each at once
    (paho leaves Nagle's algorithm on, which delays a PUBACK behind a result)."""
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _paho_state_known(client: mqtt.Client) -> bool:
    """Whether paho keeps the state the link's own PUBLISH reading and writing
    rely on, as in the version pinned in requirements.txt: its packet being read
    (`_in_packet`), its queue of packets to write (`_out_packet`), when it last
    received bytes (`_last_bytes_received`, under `_msgtime_mutex`: its
    keepalive), and its reading of one packet (`_packet_read`, with
    `_loop_rc_handle` for what ends a connection). With another paho, it reads
    and writes every packet itself."""
    state = vars(client)
    return (callable(getattr(client, "_packet_read", None)) and callable(getattr(client, "_loop_rc_handle", None))
            and isinstance(state.get("_in_packet"), dict) and "command" in state["_in_packet"]
            and isinstance(state.get("_out_packet"), collections.deque)
            and isinstance(state.get("_last_bytes_received"), float) and hasattr(state.get("_msgtime_mutex"), "acquire"))
