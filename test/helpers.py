"""Small helpers for the tests: free ports, bounded waiting, an MQTT probe."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificate(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (openssl): (cert, key)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        raise AssertionError("openssl is needed to make a test certificate (apt-get install openssl)")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class MqttProbe:
    """A paho client that publishes requests and collects results by request_id.
    Its session is persistent, so results published while the broker restarts
    are not lost to it."""

    _n = itertools.count()

    def __init__(self, port: int, topics: tuple[str, ...] = ("component_msg/result",)) -> None:
        self.port = port
        self.topics = topics
        self.messages: list[tuple[str, bytes]] = []
        self.results: dict[str, list[dict]] = {}
        self.cond = threading.Condition()
        self.connected = threading.Event()
        cid = f"probe-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.reconnect_delay_set(0.2, 1)
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10), "probe could not connect"

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_subscribe(self, *_a: Any) -> None:
        self.connected.set()  # the subscriptions are in place

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            try:
                data = json.loads(msg.payload)
            except ValueError:
                data = None
            if isinstance(data, dict):
                self.results.setdefault(str(data.get("request_id")), []).append(data)
            self.cond.notify_all()

    def publish(self, body: Any, topic: str = "component_msg", qos: int = 1) -> None:
        payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(10)

    def request(self, id_flow: Any, payload: Any = None, topic: str = "component_msg", timeout: float = 10, **extra: Any) -> dict:
        rid = extra.pop("request_id", None) or uuid.uuid4().hex
        self.publish({"id_flow": id_flow, "payload": payload, "request_id": rid, **extra}, topic)
        return self.wait_result(rid, timeout)

    def wait_result(self, rid: str, timeout: float = 10) -> dict:
        with self.cond:
            ok = self.cond.wait_for(lambda: rid in self.results, timeout)
        assert ok, f"no result for request {rid} within {timeout} s"
        return self.results[rid][0]

    def wait_messages(self, n: int, timeout: float = 10) -> list[tuple[str, bytes]]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.messages) >= n, timeout)
        assert ok, f"only {len(self.messages)} of {n} messages within {timeout} s"
        return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class InProcessNode:
    """A node without entry points (engine, drivers, placement) on its own event
    loop in a thread, for in-process tests: requests go straight to the engine."""

    def __init__(self, config: Any, rest: bool = False) -> None:
        from runtime_manager.node import Node, Parts
        from runtime_manager.process import new_event_loop

        self.node = Node(config, Parts(mqtt=False, rest=rest, orchestrator=False))
        self.engine = self.node.engine
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-node", daemon=True)

    def _call(self, coro: Any, timeout: float = 30) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> InProcessNode:
        self._thread.start()
        self._call(self.node.start())
        return self

    def run(self, req: Any, timeout: float = 20) -> dict:
        return self.engine.submit_threadsafe(req).result(timeout).to_dict()

    def submit(self, req: Any, callback: Callable[[dict], None]) -> None:
        self.engine.submit_threadsafe(req).add_done_callback(lambda f: callback(f.result().to_dict()))

    @property
    def active(self) -> int:
        return self.engine.active

    @property
    def accepting(self) -> bool:
        return self.engine.accepting

    def stop(self, timeout: float = 10) -> bool:
        """Graceful stop; True when every accepted request finished."""
        drained = self._call(self.engine.drain(timeout), timeout + 5)
        self._call(self.node.stop(), timeout + 10)
        self._close_loop()
        return drained

    def kill(self) -> None:
        """End the test's node: flows in flight are cut short, what it holds is closed."""
        if self.loop.is_closed():
            return
        self.engine.kill()
        try:
            self._call(self.node.stop(), 15)
        except Exception:
            self.loop.call_soon_threadsafe(self.node.kill)
        self._close_loop()

    def _close_loop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()
