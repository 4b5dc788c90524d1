"""How a component's answer becomes `resultN`."""

from __future__ import annotations

from typing import Any

import orjson


def decode_response(data: bytes) -> Any:
    """A response is kept as parsed JSON when it is JSON, otherwise as text."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")
