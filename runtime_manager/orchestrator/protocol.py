"""The orchestrator protocol's messages and topics, in both dialects.

    {realm}/proc/reg/{uuid}                  registration, and the orchestrator's reply
                                             (ARTS: one topic, {realm}/proc/reg)
    {realm}/proc/control/{runtime-uuid}      module create/delete in, exited out
    {realm}/proc/keepalive/{runtime-uuid}    keepalives
    {realm}/proc/stdio/{module-uuid}         a module's stdout, as it is produced

and two of our own, outside `proc/` (no orchestrator reads them), for the tools:

    {realm}/rm/presence/{runtime-uuid}       retained: who the runtime is, whether it is
                                             online or stopped, when it was last heard
    {realm}/rm/query                         a tool asks; every runtime answers at once
                                             with a fresh presence record

The ARTS dialect uses the types `arts_req`/`arts_resp`, `apis` as one string
and `filename` for `file`.
"""

from __future__ import annotations

import platform
import uuid
from dataclasses import dataclass
from typing import Any

APIS = ["wasm", "wasi", "stdio:out"]
# ARTS schedules a module on a runtime whose `apis` string contains the module's
# (default "wasi:snapshot_preview1"); its own runtimes announce these two.
ARTS_APIS = ["wasi:snapshot_preview1", "wasi:unstable", *APIS]


@dataclass(frozen=True)
class Dialect:
    realm: str
    arts: bool

    def reg_topic(self, ident: str) -> str:
        return f"{self.realm}/proc/reg" if self.arts else f"{self.realm}/proc/reg/{ident}"

    def control_topic(self, runtime: str) -> str:
        return f"{self.realm}/proc/control/{runtime}"

    def keepalive_topic(self, runtime: str) -> str:
        return f"{self.realm}/proc/keepalive/{runtime}"

    def stdio_topic(self, module: str) -> str:
        return f"{self.realm}/proc/stdio/{module}"

    def presence_topic(self, runtime: str) -> str:
        return f"{self.realm}/rm/presence/{runtime}"

    @property
    def query_topic(self) -> str:
        return f"{self.realm}/rm/query"

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
