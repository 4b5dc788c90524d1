"""Logging in the house style: `[time] [module:LEVEL] message`, short module names."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

FORMAT = "[%(asctime)s] [%(name)s:%(levelname)s] %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup_logging(level: str = "INFO", file: str | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file:
        handlers.append(logging.FileHandler(file))
    logging.basicConfig(level=level, format=FORMAT, datefmt=DATEFMT, handlers=handlers, force=True)
    for noisy in ("werkzeug", "waitress", "amqtt", "transitions", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def short(value: Any, limit: int = 200) -> str:
    """A payload for a log line: never logged whole, at most `limit` bytes."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value[: limit + 1]).decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value[: limit + 1]
    else:
        try:
            text = orjson.dumps(value, default=str)[: limit + 1].decode("utf-8", "replace")
        except TypeError:
            text = repr(value)[: limit + 1]
    return text if len(text) <= limit else text[:limit] + "…"
