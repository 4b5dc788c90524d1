"""Each host's configuration directory, made from the fleet's template:

    <root>/config/   the template's files; comm.conf with the fleet's broker and
                     the host's address for REST; runtime.conf with the node id,
                     the fleet's defaults and the host's own settings; nodes.conf
                     naming every node of the fleet (so they forward to each other)
    <root>/modules/  the template's WebAssembly modules (runtime.conf module_dir)
    <root>/state/    what the node keeps (runtime.conf state_dir)
    <root>/logs/     its log

`check` runs on the rendered directory here, before anything leaves this machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .spec import COMM_KEYS, Fleet, FleetHost

CONFIG_FILES = ("comm.conf", "components.conf", "flows.conf", "load_balancer.conf", "runtime.conf", "nodes.conf")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def rest_port(fleet: Fleet, host: FleetHost) -> int:
    port = host.settings.get("rest_port") or fleet.rest_port
    if port:
        return int(port)
    return int((_json(fleet.template / "comm.conf").get("rest") or {}).get("port", 5000))


def render(fleet: Fleet, host: FleetHost, dest: Path) -> Path:
    """Write `host`'s directory tree under `dest` (config/ and modules/); its config directory."""
    config, modules = dest / "config", dest / "modules"
    (dest / "state").mkdir(parents=True, exist_ok=True)
    config.mkdir(parents=True, exist_ok=True)
    modules.mkdir(exist_ok=True)
    for name in CONFIG_FILES:
        if (fleet.template / name).is_file() and name not in ("comm.conf", "runtime.conf", "nodes.conf"):
            shutil.copyfile(fleet.template / name, config / name)
    comm = _json(fleet.template / "comm.conf")
    mqtt_section = comm.setdefault("mqtt", {})
    # a client id of each node's own: nodes sharing one keep throwing each other off the broker
    base_id = str(mqtt_section.get("client_id") or f"rm-{fleet.name}")
    mqtt_section.update({"host": fleet.broker_host, "port": fleet.broker_port, "client_id": f"{base_id}-{host.node_id}"})
    comm.setdefault("rest", {}).update({"host": host.address, "port": rest_port(fleet, host)})
    runtime = _json(fleet.template / "runtime.conf")
    template_modules = (fleet.template / str(runtime.get("module_dir", "../runtimes"))).resolve()
    for key, value in host.settings.items():
        if key in COMM_KEYS:
            section, name = COMM_KEYS[key]
            comm.setdefault(section, {})[name] = value.upper() if key == "log_level" else value
        else:
            runtime[key] = value
    runtime.update({"node_id": host.node_id, "module_dir": "../modules", "state_dir": "../state"})
    if isinstance(runtime.get("orchestrator"), dict):
        runtime["orchestrator"] = {**runtime["orchestrator"], "name": host.name}
    endpoint = str(comm["rest"].get("endpoint", "/startrm")).lstrip("/")
    nodes = {h.node_id: {"id": h.node_id, "config": {"protocol": "http", "ip": h.address, "port": rest_port(fleet, h),
                                                    "endpoint": endpoint}} for h in fleet.hosts}
    (config / "comm.conf").write_text(json.dumps(comm, indent=2) + "\n")
    (config / "runtime.conf").write_text(json.dumps(runtime, indent=2) + "\n")
    (config / "nodes.conf").write_text(json.dumps(nodes, indent=2) + "\n")
    if template_modules.is_dir():
        for module in sorted(template_modules.iterdir()):
            if module.suffix in (".wasm", ".wat") and module.is_file():
                shutil.copyfile(module, modules / module.name)
    return config


def check(config: Path) -> list[str]:
    """The node's own check of a rendered directory: its problems, none when it is fine."""
    from ..cli import load_checked

    try:
        load_checked(config)
    except ConfigError as exc:
        return exc.errors
    return []
