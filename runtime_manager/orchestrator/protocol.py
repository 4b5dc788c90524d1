"""The orchestrator protocol's messages and topics, in both dialects
(docs/orchestrator-protocol.md; every topic name is built in `core/topics.py`, which lists them), plus two
of our own outside `proc/` (no orchestrator reads them) for the tools: a
retained presence record per runtime and a query every runtime answers.

The ARTS dialect uses the types `arts_req`/`arts_resp`, `apis` as one string
and `filename` for `file`.
"""

from __future__ import annotations

import platform
import uuid
from dataclasses import dataclass
from typing import Any

from ..core import topics

APIS = ["wasm", "wasi", "stdio:out"]
# ARTS schedules a module on a runtime whose `apis` string contains the module's
# (default "wasi:snapshot_preview1"); its own runtimes announce these two.
ARTS_APIS = ["wasi:snapshot_preview1", "wasi:unstable", *APIS]


@dataclass(frozen=True)
class Dialect:
    realm: str
    arts: bool

    def reg_topic(self, ident: str) -> str:
        return topics.reg_topic(self.realm, ident, self.arts)

    def control_topic(self, runtime: str) -> str:
        return topics.control_topic(self.realm, runtime)

    def keepalive_topic(self, runtime: str) -> str:
        return topics.keepalive_topic(self.realm, runtime)

    def stdio_topic(self, module: str) -> str:
        return topics.stdio_topic(self.realm, module)

    def presence_topic(self, runtime: str) -> str:
        return topics.presence_topic(self.realm, runtime)

    @property
    def query_topic(self) -> str:
        return topics.query_topic(self.realm)

    def kind(self, kind: str) -> str:
        """`req`/`resp` in this dialect."""
        return f"arts_{kind}" if self.arts else kind

    @property
    def apis(self) -> str | list[str]:
        return " ".join(ARTS_APIS) if self.arts else list(APIS)

    @property
    def file_key(self) -> str:
        return "filename" if self.arts else "file"

    def message(self, action: Any, data: dict[str, Any], kind: str = "req", object_id: str | None = None) -> dict[str, Any]:
        return {"object_id": object_id or str(uuid.uuid4()), "action": action, "type": self.kind(kind), "data": data}


def manager_data(manager: str, name: str) -> dict[str, Any]:
    return {"type": "manager", "uuid": manager, "name": name}


def runtime_data(dialect: Dialect, runtime: str, manager: str, name: str, max_nmodules: int) -> dict[str, Any]:
    return {
        "type": "runtime", "uuid": runtime, "name": name, "runtime_type": "linux/wasmtime",
        "max_nmodules": max_nmodules, "apis": dialect.apis,
        "platform": {"cpu": {"arch": platform.machine()}}, "metadata": {}, "parent": manager,
    }
