"""The HTTP step driver: a flow step as a call through the node's one HTTP client (`http/client.py`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..config import HttpComponent
from ..core.errors import ComponentError, ResultTooLarge, Timeout
from ..core.flows import Call
from ..core.tracecontext import OUTGOING
from ..http.client import HttpClient, HttpConnectionError, HttpProtocolError
from ..logs import short
from .response import OutputProblem, decode_response

log = logging.getLogger("http")
JSON_HEADERS = {"Content-Type": "application/json"}


def _where(call: Call) -> str:
    return f"step {call.number} ({call.component.name} endpoint {call.endpoint})"


async def http_call(client: HttpClient, comp: HttpComponent, method: str, call: Call, body: bytes | None) -> Any:
    url = comp.url(call.endpoint)
    failure = dict(step=call.number, component=comp.name, endpoint=call.endpoint)
    headers = JSON_HEADERS if body is not None else None
    traceparent = OUTGOING.get()
    if traceparent is not None:  # tracing is on: the component gets this step's context
        headers = {**(headers or {}), "traceparent": traceparent}
    for attempt in range(comp.retries + 1):
        try:
            resp = await client.request(method, url, body, headers, timeout=comp.timeout_s,
                                        limit=comp.max_output_bytes)
        except TimeoutError:
            raise Timeout(f"{_where(call)}: {method} {url} gave no answer within {comp.timeout_s} s", **failure) from None
        except HttpConnectionError as exc:
            # Only connection errors are retried: the request may not have arrived.
            if attempt < comp.retries:
                log.warning("%s: %s %s failed (%s), retry %d of %d", _where(call), method, url, exc, attempt + 1,
                            comp.retries)
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            raise ComponentError(f"{_where(call)}: cannot reach {url}: {exc}", **failure) from None
        except (HttpProtocolError, ValueError) as exc:
            raise ComponentError(f"{_where(call)}: {method} {url} failed: {exc}", **failure) from None
        if resp.status >= 400:
            raise ComponentError(f"{_where(call)}: {method} {url} answered HTTP {resp.status}: {short(resp.body, 120)}",
                                 **failure)
        try:
            return decode_response(resp.body, comp.max_output_bytes)
        except OutputProblem as exc:
            kind = ResultTooLarge if exc.too_large else ComponentError
            raise kind(f"{_where(call)}: {method} {url}: {exc}", **failure) from None
    raise AssertionError("unreachable")
