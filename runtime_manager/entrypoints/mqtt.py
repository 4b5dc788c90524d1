"""MQTT entry point: take flow requests from `mqtt.topic`, publish one result each.

A message is parsed and admitted on the loop (`MqttLink` calls `_on_request`);
its flow runs on an engine worker. A QoS 1 request is acknowledged to the
broker only after the broker has acknowledged its result, on a persistent
session, so a request in flight when the process dies is delivered again.

A result goes out at the QoS its request came in with (`mqtt.result_qos`
overrides). MQTT delivers at the lower of the publisher's and the subscriber's
QoS anyway; and a QoS 1 result for a QoS 0 request costs 20-45 ms per request
on a broker with Nagle's algorithm on (Mosquitto's default): the broker's
PUBACK is the last thing it writes, the node has nothing to send back, its
kernel delays the TCP ACK, and the broker holds the next request behind it.

MQTT 5 requests may name where the result goes with the **Response Topic**
property (instead of `reply_to` in the payload); the result carries the
request's **Correlation Data** back. Besides `mqtt.topic` (shared by the
node's workers when `mqtt.shared_group` is set) the node takes requests on its
own topic, `<mqtt.topic>/node/<id>`: that is where peers forward to.

Redelivered requests are not run twice: the results of the last
`runtime.conf` `dedupe_window` requests that carried their own `request_id`
are kept (up to 64 KiB each), and the same request again gets the kept
result; one that comes while its first copy still runs is acknowledged with
it. "The same request" is the whole of it: its id, a digest of its message
(flow, payload, everything), its answer topic and its correlation data. A
request that reuses another's id with another body is run as the request it
is: a result is never handed to a client that did not send that very request.

A peer may forward several requests in one message (core/forward_batch.py):
each is checked and run as if it had come alone, their results go back
together as they are ready (entrypoints/batch_answers.py), and the message is
acknowledged once every one of them is answered.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import paho.mqtt.client as mqtt

from ..config import Config
from ..core.errors import BadRequest, FlowFailure, InternalError, ResultTooLarge
from ..core.forward_batch import BATCH_PROPERTY, read_batch
from ..core.lifecycle import Entrypoint, wait_until
from ..core.request import FlowRequest, parse_request
from ..core.result import Result, error_result
from ..core.topics import node_topic, topic_name_problem
from ..engine import FlowEngine
from ..logs import short
from ..mqtt.link import MqttLink
from .batch_answers import Batch, BatchAnswers

log = logging.getLogger("mq")
KEPT_RESULT_BYTES = 64 * 1024

DedupeKey = tuple[str, bytes, str, bytes]  # request id, digest of the message, answer topic, correlation data


@dataclass
class _Running:
    """A request being run, and what its redelivered copies wait for: its result out."""

    copies: list[Callable[[], None]] = field(default_factory=list)


class MqttEntrypoint(Entrypoint):
    """An entry point of the node (core/lifecycle.py): `start` subscribes, `stop` stops taking
    requests (those not taken stay with the broker) and waits, bounded by
    `drain_timeout_s`, until every request it took has its result published and
    acknowledged."""

    name = "mqtt entry point"

    def __init__(self, config: Config, engine: FlowEngine, link: MqttLink) -> None:
        self.cfg = config.mqtt
        self.drain_timeout_s = config.runtime.drain_timeout_s
        self.engine, self.link = engine, link
        self.qos = self.cfg.qos
        self.accepting = False
        self.in_flight = 0  # taken and not yet acknowledged
        self.taken = 0  # requests taken since the start
        self.own_topic = node_topic(self.cfg.topic, config.node_name)
        self.window = config.runtime.dedupe_window
        self._kept: OrderedDict[DedupeKey, tuple[str, bytes, bytes | None]] = OrderedDict()  # topic, result, correlation
        self._running: dict[DedupeKey, _Running] = {}
        self._batch_answers = BatchAnswers(link, self.cfg.result_qos)
        self.topics = (self.cfg.topic, self.own_topic)
        for topic in self.topics:
            link.subscribe(topic, self._on_request, qos=self.qos, shared_group=self.cfg.shared_group, acks=True)
        # QoS 0 requests already received are taken in several at a time while
        # the engine has little waiting, one a turn of the loop beyond: a burst
        # enters the queue no faster than the loop works through it (reading all
        # that had arrived at once refused a sixth of a QoS 0 burst of 10,000
        # that reading one a turn ran whole). QoS 1 ones are bounded by the
        # Receive Maximum the link gives the broker (queue_depth + workers).
        link.read_more = lambda: engine.pending() < 2 * engine.rt.workers

    async def start(self) -> None:
        self.accepting = True
        log.info("taking requests on '%s' (qos %d), results on '%s' (qos %s)", self.cfg.topic, self.qos, self.cfg.result_topic,
                 "of each request" if self.cfg.result_qos is None else self.cfg.result_qos)

    async def stop(self) -> None:
        self.accepting = False
        if not await wait_until(lambda: not self.in_flight, self.drain_timeout_s):
            log.warning("stop: %d MQTT requests still without an acknowledged result", self.in_flight)

    def kill(self) -> None:
        self.accepting = False

    # ----- one request (on the loop) ------------------------------------------------
    def _on_request(self, msg: mqtt.MQTTMessage) -> None:
        if not self.accepting:
            return  # not acknowledged: the broker delivers it again later
        response_topic, correlation = _response_properties(msg)
        if _user_property(msg, BATCH_PROPERTY[0]) == BATCH_PROPERTY[1]:
            self._on_batch(msg, response_topic, correlation)
            return
        mid, qos = msg.mid, msg.qos
        self.in_flight += 1
        self.taken += 1
        try:
            if response_topic is not None and topic_name_problem(response_topic):
                raise BadRequest(f"the Response Topic is not a topic the node can publish to: it "
                                 f"{topic_name_problem(response_topic)}")
            req = parse_request(msg.payload, self.cfg.max_payload_bytes, via="mqtt")
            if self.engine.tracer is not None:
                req.traceparent = _user_property(msg, "traceparent")
        except BadRequest as exc:
            log.warning("bad request on '%s': %s (message: %s)", msg.topic, exc.message, short(msg.payload))
            refused = error_result(None, self.engine.node, exc)
            self.engine.refused("mqtt", refused)
            self._answer(None, self.cfg.result_topic, refused, mid, qos, correlation)
            return
        topic = response_topic or req.reply_to or self.cfg.result_topic
        key: DedupeKey | None = None
        if self.window and req.id_given:
            key = (req.request_id, hashlib.blake2b(msg.payload, digest_size=16).digest(), topic, correlation or b"")
            if self._again(key, mid, qos):
                return
            self._running[key] = _Running()
        self.engine.accept(req, lambda result: self._answer(req, topic, result, mid, qos, correlation, key))

    # ----- the dedupe window (on the loop) -------------------------------------------------
    def _again(self, key: DedupeKey, mid: int, qos: int) -> bool:
        """A request already answered or running: answered from the window, or
        acknowledged with its first copy. False: run it."""
        running = self._running.get(key)
        if running is not None:
            log.info("request %s delivered again while it runs; acknowledged with its result", key[0])
            running.copies.append(partial(self._copy_acked, mid, qos))
            return True
        kept = self._kept.get(key)
        if kept is None:
            return False
        topic, payload, correlation = kept
        log.info("request %s delivered again; answered from the dedupe window", key[0])

        def acked(_accepted: bool) -> None:
            self.link.ack(mid, qos)
            self.in_flight -= 1

        try:
            self.link.publish(topic, payload, qos=qos if self.cfg.result_qos is None else self.cfg.result_qos,
                              on_acked=acked, correlation=correlation)
        except Exception as exc:
            log.error("request %s: answering it again failed (%s); acknowledged", key[0], exc)
            acked(False)
        return True

    def _settled(self, key: DedupeKey | None, kept: tuple[str, bytes, bytes | None] | None) -> None:
        if key is None:
            return
        running = self._running.pop(key, None)
        for copy_done in running.copies if running else ():
            copy_done()
        if kept is not None and len(kept[1]) <= KEPT_RESULT_BYTES:
            self._kept[key] = kept
            while len(self._kept) > self.window:
                self._kept.popitem(last=False)

    def _copy_acked(self, mid: int, qos: int) -> None:
        self.link.ack(mid, qos)
        self.in_flight -= 1

    # ----- a batch of forwards (on the loop) -----------------------------------------------
    def _on_batch(self, msg: mqtt.MQTTMessage, topic: str | None, token: bytes | None) -> None:
        """Each request of the batch run as if it had come alone; one that cannot be
        read is answered `bad_request` in its place; a batch that cannot be read is
        answered once, with one error result."""
        mid, qos = msg.mid, msg.qos
        self.in_flight += 1
        try:
            if topic is None or token is None:
                raise BadRequest("a batch of forwards needs a Response Topic and Correlation Data")
            if topic_name_problem(topic):
                raise BadRequest(f"the Response Topic is not a topic the node can publish to: it {topic_name_problem(topic)}")
            items = read_batch(msg.payload, self.cfg.max_payload_bytes)
        except BadRequest as exc:
            log.warning("bad batch of forwards on '%s': %s", msg.topic, exc.message)
            self.taken += 1
            refused = error_result(None, self.engine.node, exc)
            self.engine.refused("mqtt", refused)
            answer_to = topic if topic is not None and not topic_name_problem(topic) else self.cfg.result_topic
            self._answer(None, answer_to, refused, mid, qos, token)
            return
        self.taken += len(items)
        batch = Batch(topic, token, mid, qos, left=len(items))
        tracing = self.engine.tracer is not None
        for index, item in enumerate(items):
            try:
                req = parse_request(item, via="mqtt")
            except BadRequest as exc:
                refused = error_result(None, self.engine.node, exc)
                self.engine.refused("mqtt", refused)
                self._batch_answer(batch, index, None, refused, None)
                continue
            if tracing:
                traceparent = item.get("traceparent")
                req.traceparent = traceparent if isinstance(traceparent, str) else None
            key: DedupeKey | None = None
            if self.window and req.id_given:
                key = (req.request_id, b"", topic, token + index.to_bytes(2, "big"))
                if self._batch_again(key, batch, index):
                    continue
                self._running[key] = _Running()
            self.engine.accept(req, partial(self._batch_answer, batch, index, req, key=key))

    def _batch_again(self, key: DedupeKey, batch: Batch, index: int) -> bool:
        """A request of a batch delivered again: answered from the window, or counted
        answered once its first copy's result is out. False: run it."""
        running = self._running.get(key)
        if running is not None:
            running.copies.append(partial(self._batch_one_less, batch))
            return True
        kept = self._kept.get(key)
        if kept is None:
            return False
        log.info("request %s of a batch delivered again; answered from the dedupe window", key[0])
        self._batch_answers.add(batch, index, kept[1], lambda _accepted: self._batch_one_less(batch))
        return True

    def _batch_answer(self, batch: Batch, index: int, req: FlowRequest | None, result: Result,
                      key: DedupeKey | None = None) -> None:
        """One request's result, added to the batch's answers of this turn: always
        (an error result in its place when it cannot go as it is)."""
        try:
            payload = result.to_json()
        except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
            failure: FlowFailure = InternalError(f"the result cannot be serialised: {exc}")
            payload = error_result(req, self.engine.node, failure, request_id=result.request_id).to_json()
        if not self._batch_answers.fits(batch, payload):
            failure = ResultTooLarge(f"the result of {len(payload)} bytes is larger than the broker takes "
                                     f"({self.link.max_packet_bytes} bytes)")
            log.warning("request %s: %s; answered %s", result.request_id, failure.message, failure.code)
            payload = error_result(req, self.engine.node, failure, request_id=result.request_id).to_json()

        def sent(accepted: bool) -> None:
            self._settled(key, (batch.topic, payload, None) if accepted else None)
            self._batch_one_less(batch)

        self._batch_answers.add(batch, index, payload, sent)

    def _batch_one_less(self, batch: Batch) -> None:
        batch.left -= 1
        if batch.left == 0:
            self.link.ack(batch.mid, batch.qos)
            self.in_flight -= 1

    # ----- one result --------------------------------------------------------------------
    def _answer(self, req: FlowRequest | None, topic: str, result: Result, req_mid: int, req_qos: int,
                correlation: bytes | None = None, key: DedupeKey | None = None) -> None:
        """Publish a request's one result, then acknowledge the request: always.
        A result that cannot go out as it is (not serialisable, larger than the
        broker takes, refused by the broker) is replaced by an error result on the
        result topic; when even that fails, the request is still acknowledged.
        Exactly one path ends in `finish` (here or in the replacement's own call)."""
        done = False
        sent: tuple[str, bytes, bytes | None] | None = None

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                self.link.ack(req_mid, req_qos)
                self.in_flight -= 1
                self._settled(key, sent)

        def fallback(failure: FlowFailure) -> None:
            log.warning("request %s: %s; answering %s on '%s'", result.request_id, failure.message, failure.code,
                        self.cfg.result_topic)
            if topic == self.cfg.result_topic and failure.code == "result_too_large" and result.code == failure.code:
                finish()  # the error result itself does not fit: nothing more to try
                return
            self._answer(req, self.cfg.result_topic, error_result(req, self.engine.node, failure, request_id=result.request_id),
                         req_mid, req_qos, correlation, key)

        try:
            payload = result.to_json()
        except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
            fallback(InternalError(f"the result cannot be serialised: {exc}"))
            return
        if not self.link.fits(topic, payload):
            fallback(ResultTooLarge(f"the result of {len(payload)} bytes is larger than the broker takes "
                                    f"({self.link.max_packet_bytes} bytes)"))
            return

        def acked(accepted: bool) -> None:
            nonlocal sent
            if accepted:
                sent = (topic, payload, correlation)
            if accepted or topic == self.cfg.result_topic:
                finish()
            else:
                # refused on reply_to (not authorised, say): tell the result topic instead
                self._answer(req, self.cfg.result_topic, error_result(req, self.engine.node, BadRequest(
                    f"the broker refused the result on reply_to '{short(topic, 80)}'"), request_id=result.request_id),
                    req_mid, req_qos, correlation, key)

        result_qos = req_qos if self.cfg.result_qos is None else self.cfg.result_qos
        try:
            self.link.publish(topic, payload, qos=result_qos, on_acked=acked, correlation=correlation)
        except Exception as exc:  # paho refuses what MQTT cannot carry
            if topic == self.cfg.result_topic and not result.ok:
                log.error("request %s: its error result cannot be published (%s); acknowledged", result.request_id, exc)
                finish()
                return
            fallback(BadRequest(f"the result cannot be published on '{short(topic, 80)}': {exc}"))


def _user_property(msg: mqtt.MQTTMessage, name: str) -> str | None:
    """An MQTT 5 user property of a message (the first of that name), or None."""
    props = getattr(msg, "properties", None)
    for key, value in getattr(props, "UserProperty", None) or ():
        if key == name and isinstance(value, str):
            return value
    return None


def _response_properties(msg: mqtt.MQTTMessage) -> tuple[str | None, bytes | None]:
    """An MQTT 5 request's Response Topic and Correlation Data (None when absent)."""
    props = getattr(msg, "properties", None)
    if props is None:
        return None, None
    topic = getattr(props, "ResponseTopic", None)
    correlation = getattr(props, "CorrelationData", None)
    return (topic or None), (bytes(correlation) if correlation else None)
