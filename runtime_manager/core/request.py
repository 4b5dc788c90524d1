"""A request to run a flow, as every entry point receives it, checked.

What a request may hold is bounded here, the same for MQTT and REST: its size
(by the entry point), its nesting depth (`MAX_DEPTH`), and a `reply_to` that
is a valid MQTT topic name, so every accepted request can be answered.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import BadRequest
from .topics import topic_name_problem

MAX_DEPTH = 64  # how deeply a payload (and a component's JSON answer) may nest
_ids = itertools.count(1)
_prefix = ""


def _new_prefix() -> None:
    """Ids are `<pid>-<random>-<n>`: unique across processes, also those forked
    from this one (a forked child would otherwise go on with its parent's count)."""
    global _ids, _prefix
    _ids = itertools.count(1)
    _prefix = f"{os.getpid():x}-{secrets.token_hex(3)}"


_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def new_request_id() -> str:
    return f"{_prefix}-{next(_ids)}"


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when lists and objects nest more than `limit` deep in `value`
    (a scalar is 0 deep, `[]` 1, `[[1]]` 2). Looks no deeper than `limit` + 1."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        inner: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            inner.extend(v for v in children if isinstance(v, (dict, list)))
        level = inner
    return False


def may_nest_deeper(raw: bytes | bytearray | memoryview | str, limit: int = MAX_DEPTH) -> bool:
    """False when the JSON text `raw` cannot nest more than `limit` deep: it holds
    no more opening brackets than that (one per level; those in strings only
    over-count). Counting bytes is much cheaper than walking the parsed value."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{") > limit
    data = bytes(raw) if isinstance(raw, memoryview) else raw
    return data.count(b"[") + data.count(b"{") > limit


@dataclass
class FlowRequest:
    id_flow: str
    payload: Any = None
    request_id: str = ""
    reply_to: str | None = None
    is_load_balancing: bool = False
    via: str = "engine"  # the entry point that took it: mqtt, rest, or engine (in-process)
    received: float = field(default_factory=time.perf_counter)
    id_given: bool = field(init=False, default=False)  # the sender named it (else the node made it up)
    traceparent: str | None = None  # W3C trace context it came with (read only while tracing is on)

    def __post_init__(self) -> None:
        self.id_given = bool(self.request_id)
        if not self.request_id:
            self.request_id = new_request_id()


def _readable_request_id(body: bytes | bytearray | memoryview | str) -> str:
    """The `request_id` of a message orjson refuses but Python's json reads (a
    lone surrogate escape such as "\\udc2d" somewhere), so that its error result
    can still be matched; "" when there is none that can be sent on."""
    import json

    try:
        data = json.loads(bytes(body) if not isinstance(body, str) else body)
    except (ValueError, RecursionError):
        return ""
    rid = data.get("request_id") if isinstance(data, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return ""
    try:
        str(rid).encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return str(rid)


def _whole(value: Any) -> Any:
    """A whole number written with a fraction (`1.0`, JSON Schema's integer too) as an int; anything else as
    it is. Only where a float holds it exactly: orjson reads integers beyond 64 bits as floats, rounded."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


def parse_request(body: bytes | str | Any, max_bytes: int | None = None, via: str = "engine") -> FlowRequest:
    """Validate a request message (MQTT payload or REST body). Raises `BadRequest`
    whose `request_id` attribute holds the id when it could be read."""
    raw = body if isinstance(body, (bytes, bytearray, memoryview, str)) else None
    if raw is not None:
        if max_bytes is not None and len(body) > max_bytes:
            raise BadRequest(f"message of {len(body)} bytes is larger than the limit of {max_bytes} bytes")
        try:
            data = orjson.loads(body)  # refuses what is not UTF-8 too: only then is it looked at again, to say where
        except orjson.JSONDecodeError as exc:
            if isinstance(body, (bytes, bytearray, memoryview)):
                try:
                    bytes(body).decode("utf-8")
                except UnicodeDecodeError as bad:
                    raise BadRequest(f"message is not UTF-8 text (byte {bad.start})") from None
            failure = BadRequest(f"message is not valid JSON: {exc}")
            failure.request_id = _readable_request_id(body)  # type: ignore[attr-defined]
            raise failure from None
    else:
        data = body
    if not isinstance(data, dict):
        raise BadRequest(f"message must be a JSON object, got {type(data).__name__}")
    request_id = _whole(data.get("request_id"))
    if (request_id is not None and not isinstance(request_id, (str, int))) or isinstance(request_id, bool):
        raise BadRequest("'request_id' must be a string or a number")
    rid = "" if request_id is None else str(request_id)
    try:
        if "id_flow" not in data:
            raise BadRequest("'id_flow' is missing")
        id_flow = _whole(data["id_flow"])
        if isinstance(id_flow, bool) or not isinstance(id_flow, (str, int)) or id_flow == "":
            raise BadRequest(f"'id_flow' must be a non-empty string or a whole number, got {orjson.dumps(id_flow).decode()[:60]}")
        reply_to = data.get("reply_to")
        if reply_to is not None:
            if not isinstance(reply_to, str):
                raise BadRequest("'reply_to' must be a topic name (a string)")
            problem = topic_name_problem(reply_to)
            if problem:
                raise BadRequest(f"'reply_to' is not a topic the node can publish to: it {problem}")
        lb = data.get("is_load_balancing", False)
        if not isinstance(lb, bool):
            raise BadRequest("'is_load_balancing' must be true or false")
        if (raw is None or may_nest_deeper(raw)) and deeper_than(data.get("payload")):
            raise BadRequest(f"'payload' nests deeper than {MAX_DEPTH} levels")
    except BadRequest as exc:
        exc.request_id = rid  # type: ignore[attr-defined]
        raise
    return FlowRequest(str(id_flow), data.get("payload"), rid, reply_to, lb, via)


def forward_body(req: FlowRequest, traceparent: str | None = None) -> bytes:
    """`req` as a peer is sent it, over REST or MQTT: placed already, with its id
    (and, in a batch of forwards while tracing is on, the trace context it runs in)."""
    body = {"id_flow": req.id_flow, "payload": req.payload, "is_load_balancing": True, "request_id": req.request_id}
    if traceparent is not None:
        body["traceparent"] = traceparent
    return orjson.dumps(body)
