"""MQTT entry point: take flow requests from a topic, publish one result each.

    python -m runtime_manager.rm_mqtt --config-dir config_files

paho's network I/O runs on the flow engine's event loop (`mqtt_link.py`); a
message is only parsed and queued there, and its flow runs on an engine worker. A QoS 1 request is acknowledged to the broker
only after the broker has acknowledged its result, on a persistent session, so
a request in flight when this process dies is delivered again.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

if __package__ in (None, ""):  # run as `python runtime_manager/rm_mqtt.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime_manager.cli import base_parser, load_or_exit, wait_for_signal
from runtime_manager.config import Config, MqttConfig
from runtime_manager.engine import FlowEngine
from runtime_manager.errors import BadRequest
from runtime_manager.logs import short
from runtime_manager.mqtt_link import MqttLink
from runtime_manager.request import error_result, parse_request

log = logging.getLogger("mq")


def make_client(cfg: MqttConfig, client_id: str, receive_maximum: int | None = None) -> tuple[mqtt.Client, dict[str, Any]]:
    """A paho 2.x client on a persistent session (MQTT 5 unless comm.conf says
    "protocol": "3.1.1"), with credentials and TLS from comm.conf. Returns the
    client and the keyword arguments for `connect`/`connect_async`."""
    connect: dict[str, Any] = {}
    if cfg.protocol == "3.1.1":
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry_s
        if receive_maximum:
            props.ReceiveMaximum = max(1, min(receive_maximum, 65535))
        connect = {"clean_start": False, "properties": props}
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password)
    if cfg.tls is not None:
        client.tls_set(ca_certs=cfg.tls.get("ca_certs"), certfile=cfg.tls.get("certfile"), keyfile=cfg.tls.get("keyfile"))
        if cfg.tls.get("insecure"):
            client.tls_insecure_set(True)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    # Results waiting for the broker's PUBACK. paho rescans its in-flight list on
    # every PUBACK, so a huge window costs CPU; 100 keeps a loopback link full.
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    return client, connect


def set_nodelay(client: mqtt.Client) -> None:
    """Requests, results and acknowledgements are small: send each at once
    (paho leaves Nagle's algorithm on, which delays a PUBACK behind a result)."""
    sock = client.socket()
    if sock is not None and hasattr(sock, "setsockopt"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class MqttEntrypoint:
    """Takes requests from the broker and hands them to the engine; publishes
    results. Its network I/O runs on the engine's event loop (`MqttLink`), so
    every callback below runs on that one thread and only hands work over."""

    def __init__(self, config: Config, engine: FlowEngine) -> None:
        self.config = config
        self.cfg = config.mqtt
        self.engine = engine
        client_id = self.cfg.client_id or f"rm-{config.node_name}-{self.cfg.topic}"
        self.qos = self.cfg.qos
        # The broker may hand us as many unacknowledged requests as we can queue.
        self.client, connect_kwargs = make_client(self.cfg, client_id, config.runtime.queue_depth + config.runtime.workers)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        if self.qos > 0:
            self.client.manual_ack_set(True)
        self.link = MqttLink(self.client, engine.loop, self.cfg.host, self.cfg.port, self.cfg.keepalive, connect_kwargs)
        self.accepting = False
        self.connected = threading.Event()
        # result mid -> (request mid, request qos): ack the request once the broker has its result
        self._awaiting: dict[int, tuple[int, int]] = {}
        self.topic = f"$share/{self.cfg.shared_group}/{self.cfg.topic}" if self.cfg.shared_group else self.cfg.topic

    # ----- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self.accepting = True
        log.info("connecting to %s:%d, topic '%s', results on '%s'", self.cfg.host, self.cfg.port, self.topic, self.cfg.result_topic)
        self.link.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking messages (those not taken stay with the broker), finish
        the accepted ones, publish their results, disconnect."""
        self.accepting = False
        self.engine.drain()
        deadline = time.monotonic() + timeout
        while self._awaiting and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._awaiting:
            log.warning("%d results not yet acknowledged by the broker at stop", len(self._awaiting))
        self.link.stop()
        self.engine.close()

    def kill(self) -> None:
        self.accepting = False
        self.engine.kill()

    # ----- paho callbacks (engine thread: hand over, never block) ---------------
    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        self.link.connected()
        set_nodelay(client)
        log.info("connected (session present: %s); subscribing to '%s' qos %d", flags.session_present, self.topic, self.qos)
        client.subscribe(self.topic, qos=self.qos)
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        if self.accepting:
            log.warning("disconnected from broker (%s); reconnecting", reason)
            self.link.reconnect_later()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if not self.accepting:
            return  # not acknowledged: the broker delivers it again later
        try:
            req = parse_request(msg.payload, self.cfg.max_payload_bytes)
        except BadRequest as exc:
            log.warning("bad request on '%s': %s (message: %s)", msg.topic, exc.message, short(msg.payload))
            self._publish(self.cfg.result_topic, error_result(None, self.engine.node, exc), msg.mid, msg.qos)
            return
        mid, qos = msg.mid, msg.qos
        self.engine.accept(req, lambda result: self._publish(req.reply_to or self.cfg.result_topic, result, mid, qos))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        pending = self._awaiting.pop(mid, None)
        if pending is not None:
            self.client.ack(*pending)

    def _publish(self, topic: str, result: dict[str, Any], req_mid: int, req_qos: int) -> None:
        info = self.client.publish(topic, orjson.dumps(result), qos=self.qos)
        if req_qos == 0:
            return
        if self.qos == 0:
            self.client.ack(req_mid, req_qos)
        else:
            self._awaiting[info.mid] = (req_mid, req_qos)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Runtime manager, MQTT entry point: runs flows requested on comm.conf mqtt.topic.")
    args = parser.parse_args(argv)
    config = load_or_exit(args)
    engine = FlowEngine(config)
    engine.start()
    entry = MqttEntrypoint(config, engine)
    entry.start()
    orchestrator = None
    if config.runtime.orchestrator is not None:
        from runtime_manager.orchestrator import RuntimeNode

        orchestrator = RuntimeNode(config)
        orchestrator.start()
    wait_for_signal(log)
    if orchestrator is not None:
        orchestrator.stop()
    entry.stop()
    log.info("stopped")


if __name__ == "__main__":
    main()
