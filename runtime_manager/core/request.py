"""A request to run a flow, as every entry point receives it."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import BadRequest

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


@dataclass
class FlowRequest:
    id_flow: str
    payload: Any = None
    request_id: str = ""
    reply_to: str | None = None
    is_load_balancing: bool = False
    via: str = "engine"  # the entry point that took it: mqtt, rest, or engine (in-process)
    received: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = new_request_id()


def parse_request(body: bytes | str | Any, max_bytes: int | None = None, via: str = "engine") -> FlowRequest:
    """Validate a request message (MQTT payload or REST body). Raises `BadRequest`
    whose `request_id` attribute holds the id when it could be read."""
    if isinstance(body, (bytes, bytearray, memoryview, str)):
        if max_bytes is not None and len(body) > max_bytes:
            raise BadRequest(f"message of {len(body)} bytes is larger than the limit of {max_bytes} bytes")
        if isinstance(body, (bytes, bytearray, memoryview)):
            try:
                bytes(body).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"message is not UTF-8 text (byte {exc.start})") from None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"message is not valid JSON: {exc}") from None
    else:
        data = body
    if not isinstance(data, dict):
        raise BadRequest(f"message must be a JSON object, got {type(data).__name__}")
    request_id = data.get("request_id")
    if (request_id is not None and not isinstance(request_id, (str, int))) or isinstance(request_id, bool):
        raise BadRequest("'request_id' must be a string or a number")
    rid = "" if request_id is None else str(request_id)
    try:
        if "id_flow" not in data:
            raise BadRequest("'id_flow' is missing")
        id_flow = data["id_flow"]
        if isinstance(id_flow, bool) or not isinstance(id_flow, (str, int)) or id_flow == "":
            raise BadRequest(f"'id_flow' must be a non-empty string or a whole number, got {orjson.dumps(id_flow).decode()[:60]}")
        reply_to = data.get("reply_to")
        if reply_to is not None and (not isinstance(reply_to, str) or not reply_to or "#" in reply_to or "+" in reply_to):
            raise BadRequest("'reply_to' must be a topic name without wildcards")
        lb = data.get("is_load_balancing", False)
        if not isinstance(lb, bool):
            raise BadRequest("'is_load_balancing' must be true or false")
    except BadRequest as exc:
        exc.request_id = rid  # type: ignore[attr-defined]
        raise
    return FlowRequest(str(id_flow), data.get("payload"), rid, reply_to, lb, via)
