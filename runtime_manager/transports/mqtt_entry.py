"""MQTT entry point: take flow requests from `mqtt.topic`, publish one result each.

A message is parsed and admitted on the loop (`MqttLink` calls `_on_request`);
its flow runs on an engine worker. A QoS 1 request is acknowledged to the
broker only after the broker has acknowledged its result, on a persistent
session, so a request in flight when the process dies is delivered again.
"""

from __future__ import annotations

import asyncio
import logging
import time

import paho.mqtt.client as mqtt

from ..config import Config
from ..core.engine import FlowEngine
from ..core.errors import BadRequest
from ..core.request import parse_request
from ..core.result import Result, error_result
from ..logs import short
from .mqtt_link import MqttLink

log = logging.getLogger("mq")


class MqttEntrypoint:
    """An entry point of the node: `start` subscribes, `stop` stops taking
    requests (those not taken stay with the broker) and waits, bounded by
    `drain_timeout_s`, until every request it took has its result published and
    acknowledged."""

    name = "mqtt entry point"
    entrypoint = True

    def __init__(self, config: Config, engine: FlowEngine, link: MqttLink) -> None:
        self.cfg = config.mqtt
        self.drain_timeout_s = config.runtime.drain_timeout_s
        self.engine, self.link = engine, link
        self.qos = self.cfg.qos
        self.accepting = False
        self.in_flight = 0  # taken and not yet acknowledged
        link.subscribe(self.cfg.topic, self._on_request, qos=self.qos, shared_group=self.cfg.shared_group, acks=True)

    async def setup(self) -> None:
        pass

    async def start(self) -> None:
        self.accepting = True
        log.info("taking requests on '%s', results on '%s' (qos %d)", self.cfg.topic, self.cfg.result_topic, self.qos)

    async def stop(self) -> None:
        self.accepting = False
        deadline = time.monotonic() + self.drain_timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.in_flight:
            log.warning("stop: %d MQTT requests still without an acknowledged result", self.in_flight)

    def kill(self) -> None:
        self.accepting = False

    # ----- one request (on the loop) ------------------------------------------------
    def _on_request(self, msg: mqtt.MQTTMessage) -> None:
        if not self.accepting:
            return  # not acknowledged: the broker delivers it again later
        mid, qos = msg.mid, msg.qos
        self.in_flight += 1
        try:
            req = parse_request(msg.payload, self.cfg.max_payload_bytes, via="mqtt")
        except BadRequest as exc:
            log.warning("bad request on '%s': %s (message: %s)", msg.topic, exc.message, short(msg.payload))
            self._publish(self.cfg.result_topic, error_result(None, self.engine.node, exc), mid, qos)
            return
        self.engine.accept(req, lambda result: self._publish(req.reply_to or self.cfg.result_topic, result, mid, qos))

    def _publish(self, topic: str, result: Result, req_mid: int, req_qos: int) -> None:
        def acked() -> None:
            self.link.ack(req_mid, req_qos)
            self.in_flight -= 1

        self.link.publish(topic, result.to_json(), qos=self.qos, on_acked=acked)
