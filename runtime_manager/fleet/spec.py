"""The fleet file: one YAML file describing a group of nodes on many hosts,
read and checked into a `Fleet`, or a `ConfigError` whose every message names
FILE:LINE and the field.

    name: kitchen
    hosts: [10.0.0.11, 10.0.0.12]          # or  hostfile: hosts.txt  (one a line; edge[01-08] ranges)
    ssh: {user: pi, port: 22, identity_file: ~/.ssh/id_ed25519, known_hosts: ~/.ssh/known_hosts}
    command: /opt/runtime-manager/.venv/bin/runtime-manager
    root: /var/lib/runtime-manager/{host}
    template: config_files
    broker: {host: 10.0.0.10, port: 1883}
    defaults: {workers: 16, log_level: info}
    nodes: {10.0.0.12: {node_id: 7, workers: 32}}

Extensions: `environment` (variables set for every command on the hosts),
`parallel` (connections at once, default 16), `connect_timeout_s` (10),
`ready_timeout_s` (60), `rest_port` (the template's).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import RuntimeConfig
from ..core.errors import ConfigError

# what `defaults` and `nodes` may set besides runtime.conf's keys, and where it goes in comm.conf
COMM_KEYS = {"log_level": ("log", "level"), "rest_port": ("rest", "port"), "mqtt_topic": ("mqtt", "topic"),
             "mqtt_qos": ("mqtt", "qos"), "rest_endpoint": ("rest", "endpoint")}
RUNTIME_KEYS = {f.name for f in dataclasses.fields(RuntimeConfig)} | {"dedupe_window", "http_port"}
NODE_KEYS = RUNTIME_KEYS | set(COMM_KEYS)
TOP_KEYS = {"name", "hosts", "hostfile", "ssh", "command", "root", "template", "broker", "defaults", "nodes",
            "environment", "parallel", "connect_timeout_s", "ready_timeout_s", "rest_port"}
MAX_HOSTS = 4096


@dataclass(frozen=True)
class SshSettings:
    user: str | None = None
    port: int = 22
    identity_file: Path | None = None  # None: the agent's keys, then the usual files
    known_hosts: Path | None = None  # None: ~/.ssh/known_hosts (host keys are always checked)


@dataclass(frozen=True)
class FleetHost:
    address: str
    node_id: str
    settings: dict[str, Any]  # defaults, then this host's own

    @property
    def name(self) -> str:
        return f"node{self.node_id}"


@dataclass(frozen=True)
class Fleet:
    name: str
    path: Path
    hosts: list[FleetHost]
    ssh: SshSettings
    command: str
    root: str  # with {host}
    template: Path
    broker_host: str
    broker_port: int
    environment: dict[str, str] = field(default_factory=dict)
    parallel: int = 16
    connect_timeout_s: float = 10.0
    ready_timeout_s: float = 60.0
    rest_port: int | None = None

    def root_of(self, host: FleetHost) -> str:
        return self.root.replace("{host}", host.address)

    def pick(self, names: list[str] | None) -> list[FleetHost]:
        """The hosts named (address or node id), or all of them."""
        if not names:
            return list(self.hosts)
        chosen = [h for h in self.hosts if h.address in names or h.node_id in names]
        unknown = set(names) - {h.address for h in chosen} - {h.node_id for h in chosen}
        if unknown:
            raise ConfigError([f"{self.path}: no host {', '.join(sorted(unknown))} in this fleet"])
        return chosen


def expand(pattern: str) -> list[str]:
    """`edge[01-08]` -> edge01 ... edge08 (the width of the first number is kept)."""
    m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\](.*)", pattern)
    if not m:
        return [pattern]
    first, last = int(m.group(2)), int(m.group(3))
    if last < first or last - first >= MAX_HOSTS:
        raise ValueError(f"range {pattern!r} runs backwards or is too long")
    width = len(m.group(2))
    return [f"{m.group(1)}{i:0{width}d}{m.group(4)}" for i in range(first, last + 1)]


class _Reader:
    """The YAML document as Python values, with the line of every key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[str] = []
        self.lines: dict[tuple[str, ...], int] = {}

    def at(self, where: tuple[str, ...]) -> str:
        line = self.lines.get(where) or self.lines.get(where[:-1]) or 1
        return f"{self.path}:{line}: {'.'.join(where)}" if where else f"{self.path}:{line}"

    def error(self, where: tuple[str, ...], message: str) -> None:
        self.errors.append(f"{self.at(where)}: {message}")

    def value(self, node: yaml.Node, where: tuple[str, ...]) -> Any:
        self.lines.setdefault(where, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key, val in node.value:
                name = str(self.value(key, (*where, "?")))
                self.lines[(*where, name)] = key.start_mark.line + 1
                out[name] = self.value(val, (*where, name))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.value(v, (*where, str(i))) for i, v in enumerate(node.value)]
        return yaml.safe_load(yaml.serialize(node))


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the fleet file: {getattr(exc, 'strerror', None) or exc}"]) from None
    r = _Reader(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = r.value(node, ()) if node is not None else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the fleet file must be a mapping (name, hosts, ssh, command, root, ...)"])
    for key in data:
        if key not in TOP_KEYS:
            r.error((key,), f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")

    def text_of(key: str, default: str | None = None) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not value:
            r.error((key,), "must be a non-empty string" if key in data else "is missing")
            return ""
        return value

    def number(key: str, default: float, kind: type = float, where: tuple[str, ...] | None = None,
               source: dict[str, Any] | None = None) -> Any:
        source = data if source is None else source
        value = source.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
                or (kind is int and not isinstance(value, int)):
            r.error(where or (key,), f"must be a positive {'whole number' if kind is int else 'number'}")
            return default
        return kind(value)

    name = text_of("name", "fleet")
    command = text_of("command")
    root = text_of("root")
    if root and "{host}" not in root:
        r.error(("root",), "must hold {host}, so that hosts sharing a disk do not collide")
    template = path.parent / text_of("template", "config_files")
    if not template.is_dir():
        r.error(("template",), f"{template} is not a directory")
    ssh_data = data.get("ssh", {})
    if not isinstance(ssh_data, dict):
        r.error(("ssh",), "must be a mapping: user, port, identity_file, known_hosts")
        ssh_data = {}
    for key in ssh_data:
        if key not in ("user", "port", "identity_file", "known_hosts"):
            r.error(("ssh", key), "unknown key (known: user, port, identity_file, known_hosts)")
        if key in ("password", "passphrase"):
            r.error(("ssh", key), "no passwords in the fleet file: use a key (the agent, or identity_file)")

    def path_of(key: str) -> Path | None:
        value = ssh_data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            r.error(("ssh", key), "must be a path")
            return None
        p = Path(value).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            r.error(("ssh", key), f"{p} is not a file")
        return p

    user = ssh_data.get("user")
    if user is not None and not isinstance(user, str):
        r.error(("ssh", "user"), "must be a string")
        user = None
    ssh = SshSettings(user, number("port", 22, int, ("ssh", "port"), ssh_data), path_of("identity_file"),
                      path_of("known_hosts"))
    broker = data.get("broker")
    if not isinstance(broker, dict) or not isinstance(broker.get("host"), str):
        r.error(("broker",), "must be a mapping with host (and port)")
        broker = {"host": "127.0.0.1"}
    broker_port = number("port", 1883, int, ("broker", "port"), broker)
    addresses: list[str] = []
    if "hosts" in data and "hostfile" in data:
        r.error(("hostfile",), "give hosts or hostfile, not both")
    if "hostfile" in data:
        hostfile = path.parent / str(data["hostfile"])
        try:
            for i, line in enumerate(hostfile.read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    try:
                        addresses += expand(line)
                    except ValueError as exc:
                        r.errors.append(f"{hostfile}:{i}: {exc}")
        except OSError as exc:
            r.error(("hostfile",), f"cannot read {hostfile}: {exc.strerror}")
    elif isinstance(data.get("hosts"), list) and data["hosts"]:
        for i, h in enumerate(data["hosts"]):
            if not isinstance(h, str) or not h or any(c.isspace() for c in h):
                r.error(("hosts", str(i)), "must be a host name or address")
                continue
            try:
                addresses += expand(h)
            except ValueError as exc:
                r.error(("hosts", str(i)), str(exc))
    else:
        r.error(("hosts",), "must be a non-empty list of hosts (or give hostfile)")
    if len(addresses) > MAX_HOSTS:
        r.error(("hosts",), f"more than {MAX_HOSTS} hosts")
    for dup in sorted({a for a in addresses if addresses.count(a) > 1}):
        r.error(("hosts",), f"{dup} is given twice")
    defaults = _settings(r, data.get("defaults", {}), ("defaults",))
    nodes = data.get("nodes", {}) or {}
    if not isinstance(nodes, dict):
        r.error(("nodes",), "must map hosts to their settings")
        nodes = {}
    for host in nodes:
        if host not in addresses:
            r.error(("nodes", host), "is not one of the fleet's hosts")
    hosts: list[FleetHost] = []
    seen_ids: dict[str, str] = {}
    for i, address in enumerate(addresses, 1):
        own = _settings(r, nodes.get(address, {}), ("nodes", address))
        node_id = str(own.pop("node_id")) if "node_id" in own else str(i)
        if node_id in seen_ids:
            r.error(("nodes", address, "node_id"), f"node id {node_id} is {seen_ids[node_id]}'s already")
        seen_ids[node_id] = address
        hosts.append(FleetHost(address, node_id, {k: v for k, v in {**defaults, **own}.items() if k != "node_id"}))
    env = data.get("environment", {}) or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
                                           for k in env):
        r.error(("environment",), "must map variable names to values")
        env = {}
    rest_port = data.get("rest_port")
    if rest_port is not None:
        rest_port = number("rest_port", 5000, int)
    fleet = Fleet(name, path, hosts, ssh, command, root, template, str(broker["host"]), broker_port,
                  {k: str(v) for k, v in env.items()}, number("parallel", 16, int),
                  number("connect_timeout_s", 10.0), number("ready_timeout_s", 60.0), rest_port)
    if r.errors:
        raise ConfigError(r.errors)
    return fleet


def _settings(r: _Reader, value: Any, where: tuple[str, ...]) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        r.error(where, "must be a mapping of runtime.conf / comm.conf settings")
        return {}
    for key in value:
        if key not in NODE_KEYS and key != "node_id":
            r.error((*where, key), "unknown setting (runtime.conf keys, or log_level, rest_port, mqtt_topic, "
                                   "mqtt_qos, rest_endpoint)")
    return dict(value)
