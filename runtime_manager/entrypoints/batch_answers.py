"""Answers to batches of forwards, sent together (core/forward_batch.py).

The results of one batch that are ready in one turn of the loop leave at the
end of that turn in one message on the batch's Response Topic, with the
batch's token as Correlation Data; results that would make it larger than the
broker takes go in a second message. Each result is told whether the broker
took its message; the entry point acknowledges the batch once all its results
are out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..core.forward_batch import answers_body
from ..logs import short
from ..mqtt.link import MqttLink

log = logging.getLogger("mq")
Sent = Callable[[bool], None]  # told whether the broker took the message that carried the answer
PACKET_SLACK = 64  # bytes of a PUBLISH besides its topic and payload (header, Correlation Data)


@dataclass
class Batch:
    """A message of forwards being answered."""

    topic: str  # its Response Topic
    token: bytes  # its Correlation Data
    mid: int
    qos: int
    left: int  # requests still without an answer out


class BatchAnswers:
    def __init__(self, link: MqttLink, result_qos: int | None) -> None:
        self.link = link
        self.result_qos = result_qos  # None: a batch's answers go out at the QoS it came in with
        self._ready: dict[tuple[str, bytes], tuple[Batch, list[tuple[int, bytes, Sent]]]] = {}
        self.messages = 0  # messages of answers published

    def fits(self, batch: Batch, result: bytes) -> bool:
        """Whether `result` fits in a message of answers by itself."""
        return len(result) + 16 <= self._room(batch)

    def add(self, batch: Batch, index: int, result: bytes, sent: Sent) -> None:
        """The answer to the batch's request at `index` (a serialised result), sent
        at the end of this turn of the loop."""
        if not self._ready:
            assert self.link.loop is not None
            self.link.loop.call_soon(self._send)
        key = (batch.topic, batch.token)
        entry = self._ready.get(key)
        if entry is None:
            entry = self._ready[key] = (batch, [])
        entry[1].append((index, result, sent))

    def _room(self, batch: Batch) -> int:
        return self.link.max_packet_bytes - len(batch.topic.encode()) - PACKET_SLACK

    def _send(self) -> None:
        ready, self._ready = self._ready, {}
        for batch, answers in ready.values():
            room, size, part = self._room(batch), 2, []
            for answer in answers:
                if part and size + len(answer[1]) + 16 > room:
                    self._publish(batch, part)
                    size, part = 2, []
                part.append(answer)
                size += len(answer[1]) + 16  # "[index," and "]," around it
            self._publish(batch, part)

    def _publish(self, batch: Batch, answers: list[tuple[int, bytes, Sent]]) -> None:
        def acked(accepted: bool) -> None:
            if not accepted:
                log.warning("the broker refused %d answers to a batch of forwards on '%s'", len(answers),
                            short(batch.topic, 80))
            for _index, _result, sent in answers:
                sent(accepted)

        body = answers_body([(index, result) for index, result, _sent in answers])
        try:
            self.link.publish(batch.topic, body, qos=batch.qos if self.result_qos is None else self.result_qos,
                              on_acked=acked, correlation=batch.token)
        except Exception as exc:  # paho refuses what MQTT cannot carry
            log.error("answers to a batch of forwards cannot be published on '%s': %s", short(batch.topic, 80), exc)
            acked(False)
            return
        self.messages += 1
