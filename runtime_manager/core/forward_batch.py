"""Forwards in batches: how nodes send each other several requests in one MQTT message.

A node that forwards over MQTT to a peer announcing `"mqtt_batches": true` in
its status sends the requests for that peer taken in one turn of its loop as
one message on the peer's own topic (cluster/mqtt_forward.py):

- payload: a JSON array of request objects, each a forward body
  (`forward_body`, with `"traceparent"` added while tracing is on);
- properties: the user property `batch: forwards` (`BATCH_PROPERTY`), a
  Response Topic and Correlation Data (the batch's token).

The peer answers on the Response Topic with the token as Correlation Data; the
answers it has ready in one turn go out together (entrypoints/mqtt.py):

- payload: a JSON array of `[index, result]` pairs, `index` being the
  request's place in the batch, `result` its result object;
- or, when the batch itself cannot be read, one error result (an object) that
  answers every request of the batch.

A peer that does not announce `mqtt_batches` (an older node) is sent one
message per request, as before.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import BadRequest

BATCH_PROPERTY = ("batch", "forwards")  # the MQTT 5 user property that marks a batch of forwards
MAX_ITEMS = 64  # requests in one batch
MAX_BYTES = 256 * 1024  # a batch is closed before it grows past this (a single larger request goes alone)


def batch_body(bodies: list[bytes]) -> bytes:
    """The payload of a batch: the forward bodies (JSON objects) as one JSON array."""
    return b"[" + b",".join(bodies) + b"]"


def read_batch(payload: bytes, max_item_bytes: int) -> list[Any]:
    """The requests of a batch (each still to be checked as a request). Raises
    BadRequest when the message is not a batch this node takes."""
    if len(payload) > MAX_ITEMS * max_item_bytes:
        raise BadRequest(f"a batch of {len(payload)} bytes is larger than {MAX_ITEMS} requests of "
                         f"{max_item_bytes} bytes")
    try:
        items = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"a batch of forwards is not valid JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise BadRequest("a batch of forwards must be a non-empty JSON array of requests")
    if len(items) > MAX_ITEMS:
        raise BadRequest(f"a batch of {len(items)} forwards holds more than {MAX_ITEMS}")
    return items


def answers_body(answers: list[tuple[int, bytes]]) -> bytes:
    """The payload of answers to a batch: `[index, result]` pairs, the results
    being JSON objects already serialised."""
    return b"[" + b",".join(b"[%d,%s]" % (index, result) for index, result in answers) + b"]"


def read_answers(payload: bytes, size: int) -> list[tuple[int, dict[str, Any]]] | dict[str, Any]:
    """The answers in a message to a batch of `size` requests: `(index, result)`
    pairs (those that are not are left out), or one result for all of them.
    Raises ValueError when the message is not JSON or neither."""
    try:
        answers = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ValueError("the answer to a batch is not JSON") from None
    if isinstance(answers, dict):
        return answers
    if not isinstance(answers, list):
        raise ValueError("the answer to a batch is neither a list of answers nor a result")
    return [(pair[0], pair[1]) for pair in answers
            if isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and 0 <= pair[0] < size
            and isinstance(pair[1], dict)]
