"""Forwarding a request to a peer over MQTT, with MQTT 5 request/response.

A peer that takes requests over MQTT announces its own request topic in its
status (`<mqtt.topic>/node/<id>`). A forward publishes the request there
(`is_load_balancing: true`, so it is not placed again) with a **Response
Topic** (this process's answers topic) and **Correlation Data** (a fresh
token), and waits, bounded by the peer's `timeout_s`, for the answer carrying
the same correlation data.

A peer that announces `"mqtt_batches": true` is sent the forwards taken in one
turn of the loop together, as one message (core/forward_batch.py), and answers
them together: in a burst, two messages carry what took one per request each
way (and their acknowledgements). Each forward still waits alone, with its own
time: one that times out leaves the others of its batch waiting.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..core.errors import TooLargeToForward
from ..core.events import FORWARDS_SENT, Events
from ..core.forward_batch import BATCH_PROPERTY, MAX_BYTES, MAX_ITEMS, batch_body, read_answers
from ..core.lifecycle import Service
from ..core.request import FlowRequest, forward_body
from ..core.topics import answers_topic
from ..core.tracecontext import OUTGOING
from ..mqtt.link import MqttLink
from .peers import Peer

log = logging.getLogger("lb")
Answer = asyncio.Future[dict[str, Any]]


@dataclass
class _Batch:
    """Forwards to one peer topic: gathered during a turn of the loop, then sent,
    then waiting for their answers (by their place in the batch)."""

    waiting: list[Answer] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    size: int = 0  # bytes of the bodies
    left: int = 0  # forwards in it still waiting
    token: bytes | None = None  # its Correlation Data, once sent


def _expire(fut: Answer, timeout_s: float) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError(f"no answer within {timeout_s:g} s"))


class MqttForwarder(Service):
    """A service of the node (core/lifecycle.py): needs the link (started before
    it); `stop` fails what still waits, so the engine's requests fall back at once."""

    name = "mqtt forwarding"

    def __init__(self, topic: str, node_id: str, link: MqttLink, events: Events | None = None) -> None:
        self.link = link
        self.events = events or Events()
        worker = re.sub(r"[^A-Za-z0-9_.-]", "_", link.client_id)
        self.answers_topic = answers_topic(topic, node_id, worker)
        self._waiting: dict[bytes, Answer] = {}  # single forwards, by correlation data
        self._gathering: dict[str, _Batch] = {}  # by peer topic, sent at the end of this turn
        self._sent: dict[bytes, _Batch] = {}  # batches waiting for answers, by their token
        self.batches_sent = 0
        link.subscribe(self.answers_topic, self._on_answer, qos=1)

    async def stop(self) -> None:
        self.kill()

    def kill(self) -> None:
        waiting, self._waiting = list(self._waiting.values()), {}
        for batch in [*self._gathering.values(), *self._sent.values()]:
            waiting += batch.waiting
        self._gathering, self._sent = {}, {}
        for fut in waiting:
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
        loop = self.link.loop  # the loop the link runs on, this one (asking asyncio is a system call on 3.11)
        assert loop is not None
        if peer.status.get("mqtt_batches") is True:
            fut, batch = self._gather(loop, topic, req)
            expiry = loop.call_at(loop.time() + timeout_s, _expire, fut, timeout_s)  # one timer, not a Timeout each
            try:
                return await fut
            finally:
                expiry.cancel()
                self._one_less(batch)
        correlation = secrets.token_bytes(12)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.answers_topic
        props.CorrelationData = correlation
        traceparent = OUTGOING.get()
        if traceparent is not None:  # tracing is on: the peer's spans join this forward's
            props.UserProperty = [("traceparent", traceparent)]
        body = forward_body(req)
        if len(body) > self._room(topic):
            raise TooLargeToForward(f"the request of {len(body)} bytes is larger than the broker takes")
        fut = loop.create_future()
        self._waiting[correlation] = fut
        try:
            self.link.publish(topic, body, qos=1, properties=props)
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None
        finally:
            self._waiting.pop(correlation, None)

    # ----- forwards in batches ----------------------------------------------------------------
    def _gather(self, loop: asyncio.AbstractEventLoop, topic: str, req: FlowRequest) -> tuple[Answer, _Batch]:
        """`req` added to the batch for `topic` that leaves at the end of this turn."""
        traceparent = OUTGOING.get()
        body = forward_body(req, traceparent)
        room = min(MAX_BYTES, self._room(topic))
        if len(body) + 2 > room:
            raise TooLargeToForward(f"the request of {len(body)} bytes is larger than the broker takes")
        batch = self._gathering.get(topic)
        if batch is not None and (len(batch.waiting) >= MAX_ITEMS or batch.size + len(batch.bodies) + len(body) + 2 > room):
            self._send(topic, batch)  # full: it goes now, a new one gathers
            batch = None
        if batch is None:
            batch = self._gathering[topic] = _Batch()
            loop.call_soon(self._send_gathered, topic, batch)
        fut: Answer = loop.create_future()
        batch.waiting.append(fut)
        batch.bodies.append(body)
        batch.size += len(body)
        batch.left += 1
        return fut, batch

    def _room(self, topic: str) -> int:
        """Bytes a payload to `topic` may have: the broker's packet limit less the
        topic and the properties (Response Topic, Correlation Data, the batch mark)."""
        return self.link.max_packet_bytes - len(topic.encode()) - len(self.answers_topic.encode()) - 64

    def _send_gathered(self, topic: str, batch: _Batch) -> None:
        if self._gathering.get(topic) is batch:
            self._send(topic, batch)

    def _send(self, topic: str, batch: _Batch) -> None:
        """Publish a gathered batch (what already timed out left in, with its place)."""
        if self._gathering.get(topic) is batch:
            del self._gathering[topic]
        if batch.left <= 0:
            return  # every forward in it has already ended (the node is stopping)
        batch.token = token = secrets.token_bytes(12)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.answers_topic
        props.CorrelationData = token
        props.UserProperty = [BATCH_PROPERTY]
        body, batch.bodies = batch_body(batch.bodies), []
        self._sent[token] = batch
        try:
            if not self.link.connected:
                raise ConnectionError("not connected to the broker")
            self.link.publish(topic, body, qos=1, properties=props)
            self.batches_sent += 1
            self.events.emit(FORWARDS_SENT, batch.left)
        except Exception as exc:
            for fut in batch.waiting:
                if not fut.done():
                    fut.set_exception(ConnectionError(f"the batch cannot be published: {exc}"))

    def _one_less(self, batch: _Batch) -> None:
        """A forward of `batch` has ended (answered, timed out, failed): the batch
        is forgotten with its last."""
        batch.left -= 1
        if batch.left <= 0 and batch.token is not None and self._sent.get(batch.token) is batch:
            del self._sent[batch.token]

    def _batch_answered(self, batch: _Batch, payload: bytes) -> None:
        try:
            answers = read_answers(payload, len(batch.waiting))
        except ValueError as exc:
            for fut in batch.waiting:
                if not fut.done():
                    fut.set_exception(exc)
            return
        if isinstance(answers, dict):  # the peer could not read the batch: one answer for all
            for fut in batch.waiting:
                if not fut.done():
                    fut.set_result(answers)
            return
        for index, answer in answers:
            fut = batch.waiting[index]
            if not fut.done():
                fut.set_result(answer)

    def _on_answer(self, msg: mqtt.MQTTMessage) -> None:
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        batch = self._sent.get(bytes(correlation)) if correlation else None
        if batch is not None:
            self._batch_answered(batch, msg.payload)
            return
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
