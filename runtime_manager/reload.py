"""What a configuration reload changes (SIGHUP, `python -m runtime_manager reload`).

`changes(old, new)` compares two loaded configurations and sorts every
difference into what a running node applies at once and what needs a restart.
It is plain data, so the rules can be read and tested here; `Node.reload`
applies them.

Applied live: flows (added, removed, changed), components (an HTTP component
moved, a WebAssembly module added or changed), the load balancer (policy,
address, threshold), the peers of nodes.conf, `runtime.task_timeout_ms` and
the log level. Requests already running finish on the configuration they
started with. Everything else (the broker and its topics, the REST address and
token, worker and queue sizes, the orchestrator, status publishing) is named
in the log as needing a restart and keeps its running value.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from .config import Config
from .core.flows import natural_order

# runtime.conf keys a running node takes at once
LIVE_RUNTIME_KEYS = frozenset({"task_timeout_ms"})


@dataclass
class Changes:
    flows_added: list[str] = field(default_factory=list)
    flows_removed: list[str] = field(default_factory=list)
    flows_changed: list[str] = field(default_factory=list)
    components_changed: list[str] = field(default_factory=list)  # added, removed, changed (or a module file changed)
    live: list[str] = field(default_factory=list)  # other settings applied at once ("load_balancer.policy")
    needs_restart: list[str] = field(default_factory=list)  # "mqtt.host (a restart applies it)"

    @property
    def any(self) -> bool:
        return bool(self.flows_added or self.flows_removed or self.flows_changed or self.components_changed
                    or self.live or self.needs_restart)

    def summary(self) -> str:
        parts = []
        for label, names in (("flows added", self.flows_added), ("flows removed", self.flows_removed),
                             ("flows changed", self.flows_changed), ("components changed", self.components_changed),
                             ("settings", self.live)):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return "; ".join(parts) or "nothing to apply"

    def to_dict(self) -> dict[str, Any]:
        return {"flows_added": self.flows_added, "flows_removed": self.flows_removed, "flows_changed": self.flows_changed,
                "components_changed": self.components_changed, "live": self.live, "needs_restart": self.needs_restart}


def changes(old: Config, new: Config) -> Changes:
    found = Changes()
    found.flows_added = sorted(set(new.flows) - set(old.flows), key=natural_order)
    found.flows_removed = sorted(set(old.flows) - set(new.flows), key=natural_order)
    found.flows_changed = sorted((f for f in set(old.flows) & set(new.flows) if old.flows[f] != new.flows[f]), key=natural_order)
    found.components_changed = sorted(n for n in set(old.components) | set(new.components)
                                      if old.components.get(n) != new.components.get(n))
    found.live += _differences("load_balancer", old.load_balancer, new.load_balancer)
    if old.nodes != new.nodes:
        found.live += [f"nodes.{n}" for n in sorted(set(old.nodes) | set(new.nodes)) if old.nodes.get(n) != new.nodes.get(n)]
    if old.log.level != new.log.level:
        found.live.append("log.level")
    for key in _differences("runtime", old.runtime, new.runtime):
        (found.live if key.split(".")[1] in LIVE_RUNTIME_KEYS else found.needs_restart).append(key)
    found.needs_restart += _differences("mqtt", old.mqtt, new.mqtt)
    found.needs_restart += _differences("rest", old.rest, new.rest)
    if old.log.file != new.log.file:
        found.needs_restart.append("log.file")
    return found


def _differences(section: str, old: Any, new: Any) -> list[str]:
    return [f"{section}.{f.name}" for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def merged(running: Config, new: Config) -> Config:
    """The configuration a node runs after a reload: what is applied live from
    `new`, the rest as it runs now."""
    runtime = replace(running.runtime, **{k: getattr(new.runtime, k) for k in LIVE_RUNTIME_KEYS})
    return replace(new, mqtt=running.mqtt, rest=running.rest, runtime=runtime,
                   log=replace(new.log, file=running.log.file))
