"""Two processes with one node id: found before the newcomer connects.

Two nodes with the same id share MQTT client ids; each connection of one
throws the other off the broker, and Mosquitto closes the old connection
without telling it why. So a node looks before it connects its own links:
a throwaway connection reads the retained status of its id and listens for a
live one. A status that is `online`, fresh, and from another instance (another
host, or another process there) means the id is taken: the newcomer stops
with one message naming the other, and the running node is left alone.

A retained `online` status whose node does not answer a `status` command on
its control topic (nor publish again within an interval and a half, for nodes
that do not take the command; two seconds at most) is a node that died
without its will reaching the broker yet: that one does not stop the start.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from ..config import MqttConfig
from ..mqtt.link import make_client

log = logging.getLogger("peers")
RETAINED_WAIT_S = 0.3  # after the subscription is acknowledged: the retained status has come by then
MAX_WAIT_S = 2.0  # for a live status from the other instance, once asked for one


class DuplicateNodeId(RuntimeError):
    """Another running process has this node's id."""


@dataclass(frozen=True)
class Instance:
    """Who runs a node: a host and a process (the supervisor's under `serve --processes`)."""

    host: str
    pid: int

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid}

    @staticmethod
    def this(supervised: bool) -> Instance:
        return Instance(socket.gethostname(), os.getppid() if supervised else os.getpid())


def _other(status: Any, node_id: str, me: Instance) -> Instance | None:
    """The instance an `online` status of `node_id` names, when it is not `me`."""
    if not isinstance(status, dict) or str(status.get("node")) != node_id or status.get("state") != "online":
        return None
    who = status.get("instance")
    if not isinstance(who, dict) or not isinstance(who.get("host"), str) or not isinstance(who.get("pid"), int):
        return None
    other = Instance(who["host"], who["pid"])
    return None if other == me else other


def find_twin(cfg: MqttConfig, topic: str, node_id: str, me: Instance, interval_s: float,
              connect_timeout_s: float = 3.0, control: str | None = None) -> tuple[Instance, float] | None:
    """Another live instance publishing `node_id`'s status on `topic`, and how
    long ago it was heard (seconds); None when there is none, or when the
    broker cannot be reached now (the node's own links keep trying). Blocking:
    call it off the loop."""
    heard: list[tuple[Any, bool, float]] = []  # (status, retained, when)
    cond = threading.Condition()
    subscribed = threading.Event()
    client, connect = make_client(cfg, f"rm-check-{uuid.uuid4().hex[:10]}", persistent=False)
    client.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_a: subscribed.set()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            status = orjson.loads(msg.payload) if msg.payload else None
        except orjson.JSONDecodeError:
            return
        with cond:
            heard.append((status, bool(msg.retain), time.time()))
            cond.notify_all()

    client.on_message = on_message
    try:
        client.connect(cfg.host, cfg.port, 30, **connect)
    except (OSError, ValueError) as exc:
        log.debug("could not look for another node %s before connecting: %s", node_id, exc)
        return None
    client.loop_start()
    try:
        if not subscribed.wait(connect_timeout_s):
            return None
        with cond:
            cond.wait_for(lambda: bool(heard), RETAINED_WAIT_S)
            retained = [s for s, r, _t in heard if r]
            if not retained:
                return None  # a running node keeps its status retained: nobody has this id
            status = retained[-1]
            at = status.get("time") if isinstance(status, dict) else None
            announced = status.get("interval_ms") if isinstance(status, dict) else None
            interval = announced / 1000 if isinstance(announced, (int, float)) and announced > 0 else interval_s
            fresh = isinstance(at, (int, float)) and time.time() - at < 3 * max(interval, 0.1)
            if _other(status, node_id, me) is None or not fresh:
                return None
            # a live status from another instance? Ask it for one now (a node answers at
            # once; one of an older version publishes every interval): wait a little for it
            if control is not None:
                client.publish(control, orjson.dumps({"command": "status"}), qos=1)
            cond.wait_for(lambda: any(not r and _other(s, node_id, me) for s, r, _t in heard),
                          min(MAX_WAIT_S, 1.5 * max(interval, 0.2)))
            live = [s for s, r, _t in heard if not r and _other(s, node_id, me)]
        if not live:
            return None  # it died without its will reaching the broker yet
        other = _other(live[-1], node_id, me)
        assert other is not None
        at = live[-1].get("time")
        return other, max(0.0, time.time() - at) if isinstance(at, (int, float)) else 0.0
    finally:
        client.disconnect()
        client.loop_stop()
