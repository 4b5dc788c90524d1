"""How a component's answer becomes `resultN`, bounded."""

from __future__ import annotations

from typing import Any

import orjson

from ..core.request import MAX_DEPTH, deeper_than, may_nest_deeper


class OutputProblem(Exception):
    """An answer that cannot become a result; the message says why."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def decode_response(data: bytes, max_bytes: int | None = None) -> Any:
    """A response is kept as parsed JSON when it is JSON, otherwise as text. With
    `max_bytes`, the result as it will be sent on (JSON-encoded: a text's control
    characters grow sixfold) may be no larger; JSON may nest at most MAX_DEPTH deep."""
    if max_bytes is not None and len(data) > max_bytes:
        raise OutputProblem(f"output of {len(data)} bytes is larger than max_output_bytes ({max_bytes})", too_large=True)
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        text = data.decode("utf-8", "replace")
        if max_bytes is not None and not text.isprintable() and len(encoded := orjson.dumps(text)) > max_bytes:
            raise OutputProblem(f"output of {len(encoded)} bytes once encoded as a JSON string is larger than "
                                f"max_output_bytes ({max_bytes})", too_large=True) from None
        return text
    if isinstance(value, (dict, list)) and may_nest_deeper(data) and deeper_than(value):
        raise OutputProblem(f"JSON answer nests deeper than {MAX_DEPTH} levels")
    return value
