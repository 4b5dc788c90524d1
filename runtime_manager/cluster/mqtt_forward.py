"""Forwarding a request to a peer over MQTT, with MQTT 5 request/response.

A peer that takes requests over MQTT announces its own request topic in its
status (`<mqtt.topic>/node/<id>`). A forward publishes the request there
(`is_load_balancing: true`, so it is not placed again) with a **Response
Topic** (this process's answers topic) and **Correlation Data** (a fresh
token), and waits, bounded by the peer's `timeout_s`, for the answer carrying
the same correlation data.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..core.lifecycle import Service
from ..core.request import FlowRequest, forward_body
from ..core.topics import answers_topic
from ..core.tracecontext import OUTGOING
from ..mqtt.link import MqttLink
from .peers import Peer

log = logging.getLogger("lb")


class MqttForwarder(Service):
    """A service of the node (core/lifecycle.py): needs the link (started before
    it); `stop` fails what still waits, so the engine's requests fall back at once."""

    name = "mqtt forwarding"

    def __init__(self, topic: str, node_id: str, link: MqttLink) -> None:
        self.link = link
        worker = re.sub(r"[^A-Za-z0-9_.-]", "_", link.client_id)
        self.answers_topic = answers_topic(topic, node_id, worker)
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        link.subscribe(self.answers_topic, self._on_answer, qos=1)

    async def stop(self) -> None:
        self.kill()

    def kill(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the node is stopping"))

    async def forward(self, peer: Peer, req: FlowRequest, timeout_s: float) -> dict[str, Any]:
        """The peer's answer to `req`. Raises when it is not connected, the topic
        cannot be published to, or no answer comes within `timeout_s`."""
        topic = peer.mqtt_topic
        if topic is None:
            raise ConnectionError(f"node {peer.id} announces no request topic")
        if not self.link.connected:
            raise ConnectionError("not connected to the broker")
        correlation = secrets.token_bytes(12)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.answers_topic
        props.CorrelationData = correlation
        traceparent = OUTGOING.get()
        if traceparent is not None:  # tracing is on: the peer's spans join this forward's
            props.UserProperty = [("traceparent", traceparent)]
        body = forward_body(req)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = fut
        try:
            self.link.publish(topic, body, qos=1, properties=props)
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None
        finally:
            self._waiting.pop(correlation, None)

    def _on_answer(self, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        fut = self._waiting.get(bytes(correlation)) if correlation else None
        if fut is None or fut.done():
            log.debug("an answer on '%s' that nothing waits for (late, or a duplicate)", msg.topic)
            return
        try:
            answer = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            fut.set_exception(ValueError("the answer is not JSON"))
            return
        fut.set_result(answer if isinstance(answer, dict) else {"status": None})
