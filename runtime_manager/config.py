"""Read and validate the config directory into one immutable `Config`.

Every file is checked and every problem collected before anything starts:
`load_config` raises `ConfigError` listing each one as `FILE: key.path: message`
(JSON) or `FILE:LINE:COL: message` (syntax). Files written for the original
FRACTAL runtime manager load unchanged; every newer key is optional.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.errors import ConfigError
from .core.flows import Flow, FlowRules, parse_flows, resolve_flows
from .core.topics import topic_name_problem

MiB = 1024 * 1024
_MISSING = object()
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def http_url(protocol: str, ip: str, port: int, path: str) -> str:
    """Paths are written with or without their leading slash ("endpoint1", "/LB/id_node")."""
    return f"{protocol}://{ip}:{port}/{path.lstrip('/')}"


@dataclass(frozen=True)
class MqttConfig:
    topic: str = "component_msg"
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive: int = 60
    qos: int = 1
    result_qos: int | None = None  # None: a result goes out at the QoS its request came in with
    result_topic: str = ""
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls: dict[str, Any] | None = None
    shared_group: str | None = None
    max_payload_bytes: int = 4 * MiB
    session_expiry_s: int = 86400
    protocol: str = "5"  # "5" or "3.1.1"


@dataclass(frozen=True)
class RestConfig:
    endpoint: str = "/startrm"
    host: str = "127.0.0.1"
    port: int = 5000
    token: str | None = None
    max_body_bytes: int = 4 * MiB
    threads: int = 16
    max_connections: int = 1000
    idle_timeout_s: float = 30.0
    lb_endpoint: str = "/lb/id_node"  # this node as a load balancer for others (GET)


@dataclass(frozen=True)
class LogConfig:
    file: str | None = None
    level: str = "INFO"


@dataclass(frozen=True)
class HttpComponent:
    name: str
    id: int
    protocol: str
    ip: str
    port: int
    endpoints: dict[str, str]
    timeout_s: float = 10.0
    retries: int = 2
    max_output_bytes: int = MiB

    def url(self, endpoint: str) -> str:
        return http_url(self.protocol, self.ip, self.port, self.endpoints[endpoint])


@dataclass(frozen=True)
class WasmLimits:
    timeout_ms: int = 1000
    memory_mb: int = 64
    fuel: int | None = None
    concurrency: int = 4  # calls of this component running at once; more wait their turn


@dataclass(frozen=True)
class WasmComponent:
    name: str
    id: int
    module: Path
    endpoints: dict[str, str]
    limits: WasmLimits = WasmLimits()
    max_output_bytes: int = MiB


Component = HttpComponent | WasmComponent


@dataclass(frozen=True)
class LoadBalancerConfig:
    policy: str = "local"  # one of POLICIES
    protocol: str = "http"
    ip: str = "127.0.0.1"
    port: int = 0
    endpoint: str = ""
    timeout_s: float = 2.0
    threshold: float = 0.8  # local_first: home while its load (in flight and queued / workers) is below this

    @property
    def url(self) -> str:
        return http_url(self.protocol, self.ip, self.port, self.endpoint)


# external: ask the load balancer (the original protocol); local: always home;
# round_robin: home and the peers in turn; least_loaded: the healthy node with
# the lowest load, home included; local_first: home below `threshold`, else least_loaded.
POLICIES = ("external", "local", "round_robin", "least_loaded", "local_first")


@dataclass(frozen=True)
class PeerAddress:
    id: str
    protocol: str
    ip: str
    port: int
    endpoint: str
    token: str | None = None
    timeout_s: float = 30.0
    forward: str = "rest"  # "rest" (POST, the original protocol) or "mqtt" (the peer's own request topic)

    @property
    def url(self) -> str:
        return http_url(self.protocol, self.ip, self.port, self.endpoint)


@dataclass(frozen=True)
class TracingConfig:
    """runtime.conf `tracing`: spans over OTLP/HTTP (off without the section)."""

    otlp_endpoint: str  # e.g. http://127.0.0.1:4318/v1/traces (an OpenTelemetry Collector, Jaeger, Tempo...)
    sampling_ratio: float = 1.0  # of the traces this node starts; a request's own traceparent decides for its trace
    service_name: str = "runtime-manager"
    export_interval_ms: int = 1000  # spans are sent in batches at least this often
    max_queue: int = 8192  # spans waiting to be sent; beyond, the oldest are dropped (and counted)
    headers: dict[str, str] | None = None  # sent with every export (a collector's API key, say)


@dataclass(frozen=True)
class OrchestratorConfig:
    realm: str = "realm"
    name: str = ""
    dialect: str = "silverline"
    max_nmodules: int = 16
    reg_timeout_s: float = 5.0
    ka_interval_sec: float = 60.0
    state_file: str = "runtime_state.json"
    channel_prefix: str | None = None  # module channels' topics must start with it (None: "{realm}/"; "": any)
    migratable: bool = True  # modules are made migratable at load (when Binaryen is installed)
    migrate_timeout_ms: int = 2000  # how long a move waits for a module's safe point
    on_stop: str = "stop"  # what a clean stop does with running modules: stop them, or migrate them
    checkpoint_s: float = 0.0  # keep each migratable module's checkpoint on the broker this often (0: never)
    module_memory_mb: int = 64  # a module's linear memory limit (and the largest checkpoint taken in)


@dataclass(frozen=True)
class RuntimeConfig:
    node_id: str | None = None
    workers: int = 64
    queue_depth: int = 4096
    task_timeout_ms: int = 30000
    heartbeat_interval_ms: int = 30000
    drain_timeout_s: float = 10.0
    wasm_threads: int = 2
    wasm_max_threads: int = 16
    module_dir: Path = Path("runtimes")
    state_dir: Path | None = None  # where the node keeps what outlives it (None: the config directory)
    orchestrator: OrchestratorConfig | None = None
    tracing: TracingConfig | None = None
    status_interval_ms: int = 1000  # how often the node looks at its load, and reports it when it moved (0: no
    #                                 membership at all, and no peer table)
    status_prefix: str = "rm/nodes"  # statuses are retained on <status_prefix>/<node id> (group: .../group/<g>/<id>)
    group: str = ""  # the membership group: a node hears its own group's statuses only ("": the default group)
    status_heartbeat_ms: int = 1000  # the whole status, retained, at least this often (its silence: 3 of these);
    #                                  default 1000 in the default group, 5000 in a named one
    load_report_delta: float = 0.25  # a load report when the load moved this much since the last one (or to/from 0)
    presence_keepalive_s: int = 2  # the presence link's MQTT keepalive: a stopped node's will comes after 1.5x this
    discover: bool = False  # peers heard on the status topic join placement (else only those in nodes.conf)
    dedupe_window: int = 1000  # recent MQTT request ids answered again from memory when redelivered (0: off)
    http_port: int | None = None  # a node without REST serves /health, /livez, /readyz, /status, /metrics, /ui here
    publish_prefix: str = "flows/"  # PUBLISH steps of flows may publish only under it ("": any topic but the node's own)
    dead_letter_topic: str | None = None  # every request that ends in an error, with its error, is published here


@dataclass(frozen=True)
class Config:
    dir: Path
    mqtt: MqttConfig
    rest: RestConfig
    log: LogConfig
    components: dict[str, Component]
    flows: dict[str, Flow]
    load_balancer: LoadBalancerConfig
    nodes: dict[str, PeerAddress]
    runtime: RuntimeConfig
    summary: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def node_name(self) -> str:
        return self.runtime.node_id or os.uname().nodename


class _Section:
    """Typed reads of one JSON object, recording `FILE: key.path: message` errors."""

    def __init__(self, file: str, data: Any, path: str, errors: list[str]) -> None:
        self.file, self.path, self.errors = file, path, errors
        self.data = data if isinstance(data, dict) else {}
        self.seen: set[str] = set()
        if not isinstance(data, dict):
            self.error(f"expected an object, got {type(data).__name__}")

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, message: str, name: str | None = None) -> None:
        where = self.key(name) if name else (self.path or "(top level)")
        self.errors.append(f"{self.file}: {where}: {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        self.seen.add(name)
        if name not in self.data:
            if default is _MISSING:
                self.error("is required", name)
            return None if default is _MISSING else default
        value = self.data[name]
        if value is None and default is None:
            return None
        if isinstance(value, str) and "${" in value:
            value = self._expand(value, name)
            if value is None:
                return default if default is not _MISSING else None
        if kind is int or kind is float:
            # Ports and counts written as strings ("6000") are accepted.
            if isinstance(value, str):
                try:
                    value = kind(value.strip())
                except ValueError:
                    self.error(f"expected a number, got {value!r}", name)
                    return default if default is not _MISSING else None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.error(f"expected a number, got {json.dumps(value)}", name)
                return default if default is not _MISSING else None
            if kind is int and value != int(value):
                self.error(f"expected a whole number, got {value}", name)
            return kind(value)
        if not isinstance(value, kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            names = names.replace("str", "a string").replace("dict", "an object").replace("list", "a list")
            self.error(f"expected {names}, got {json.dumps(value)[:60]}", name)
            return default if default is not _MISSING else None
        return value

    def _expand(self, text: str, name: str) -> str | None:
        """`${VAR}` and `${VAR:-default}` from the environment; None (and an error
        naming the file and key) when a variable without default is not set."""
        missing: list[str] = []

        def one(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None:
                if m.group(2) is None:
                    missing.append(m.group(1))
                    return ""
                return m.group(2)
            return value

        expanded = _ENV_REF.sub(one, text)
        if missing:
            self.error(f"environment variable {', '.join(missing)} is not set (write ${{NAME:-default}} for a default)", name)
            return None
        return expanded

    def secret(self, name: str) -> str | None:
        """A credential given as `name`, or as `name_file`: the path of a file whose
        content (without its trailing newline) is the secret."""
        value = self.get(name, str, None)
        path = self.get(f"{name}_file", str, None)
        if path is None:
            return value
        if value is not None:
            self.error(f"give {name} or {name}_file, not both", name)
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            self.error(f"cannot read the secret file {path}: {getattr(exc, 'strerror', None) or exc}", f"{name}_file")
            return None

    def positive(self, name: str, kind: type, default: Any) -> Any:
        value = self.get(name, kind, default)
        if value is not None and value <= 0:
            self.error(f"must be greater than 0, got {value}", name)
        return value

    def host(self, name: str, default: Any = _MISSING) -> str:
        """A host name or address: not empty, no spaces, no scheme or port."""
        value = self.get(name, str, default)
        if isinstance(value, str) and (not value.strip() or any(c.isspace() for c in value) or "/" in value):
            self.error(f"not a host name or address: {value!r}", name)
        return value

    def port(self, name: str, default: Any = _MISSING) -> int:
        value = self.get(name, int, default)
        if value is not None and not 0 < value < 65536:
            self.error(f"not a TCP port: {value}", name)
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        value = self.get(name, str, default)
        if value is not None and value not in choices:
            self.error(f"must be one of {', '.join(choices)}, got {value!r}", name)
        return value

    def sub(self, name: str, required: bool = False) -> _Section | None:
        self.seen.add(name)
        if name not in self.data:
            if required:
                self.error("is required", name)
            return None
        return _Section(self.file, self.data[name], self.key(name), self.errors)

    def done(self) -> None:
        """Unknown keys are errors: a misspelt option must not be ignored silently."""
        for name in self.data:
            if name not in self.seen:
                known = ", ".join(sorted(self.seen))
                self.error(f"unknown key (known here: {known})", name)


def _read_json(path: Path, errors: list[str], required: bool = True) -> Any:
    if not path.exists():
        if required:
            errors.append(f"{path.name}: file not found in {path.parent}")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except IsADirectoryError:
        errors.append(f"{path.name}: is a directory, not a file")
    except OSError as exc:
        errors.append(f"{path.name}: cannot read: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        errors.append(f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    except json.JSONDecodeError as exc:
        errors.append(f"{path.name}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}")
    return None


def _read_comm(data: Any, errors: list[str]) -> tuple[MqttConfig, RestConfig, LogConfig]:
    if data is None:  # missing or unreadable: already reported
        return MqttConfig(), RestConfig(), LogConfig()
    top = _Section("comm.conf", data, "", errors)
    m = top.sub("mqtt", required=True)
    mqtt = MqttConfig()
    if m is not None:
        topic = m.get("topic", str)
        mqtt = MqttConfig(
            topic=topic or "",
            host=m.host("host"),
            port=m.port("port"),
            keepalive=m.positive("keepalive", int, 60),
            qos=m.get("qos", int, 1),
            result_qos=m.get("result_qos", int, None),
            result_topic=m.get("result_topic", str, f"{topic}/result"),
            client_id=m.get("client_id", str, ""),
            username=m.get("username", str, None),
            password=m.secret("password"),
            tls=m.get("tls", dict, None),
            shared_group=m.get("shared_group", str, None),
            max_payload_bytes=m.positive("max_payload_bytes", int, 4 * MiB),
            session_expiry_s=m.get("session_expiry_s", int, 86400),
            protocol=m.choice("protocol", ("5", "3.1.1"), "5"),
        )
        if mqtt.qos not in (0, 1, 2):
            m.error(f"must be 0, 1 or 2, got {mqtt.qos}", "qos")
        if mqtt.result_qos not in (None, 0, 1, 2):
            m.error(f"must be 0, 1 or 2, got {mqtt.result_qos}", "result_qos")
        if topic is not None and (not topic or "#" in topic or "+" in topic):
            m.error("must be a plain topic name (no wildcards)", "topic")
        m.done()
    r = top.sub("rest", required=True)
    rest = RestConfig()
    if r is not None:
        endpoint = r.get("endpoint", str, "/startrm")
        rest = RestConfig(
            endpoint="/" + endpoint.lstrip("/"),
            host=r.host("host", "127.0.0.1"),
            port=r.port("port", 5000),
            token=r.secret("token"),
            max_body_bytes=r.positive("max_body_bytes", int, 4 * MiB),
            threads=r.positive("threads", int, 16),
            max_connections=r.positive("max_connections", int, 1000),
            idle_timeout_s=r.positive("idle_timeout_s", float, 30.0),
            lb_endpoint="/" + r.get("lb_endpoint", str, "/lb/id_node").lstrip("/"),
        )
        reserved = ("/health", "/livez", "/readyz", "/status", "/metrics", "/ui", "/openapi.json")
        if rest.endpoint in reserved:
            r.error(f"{rest.endpoint} is reserved", "endpoint")
        if rest.lb_endpoint in (*reserved, rest.endpoint):
            r.error(f"{rest.lb_endpoint} is taken", "lb_endpoint")
        r.done()
    lg = top.sub("log")
    log = LogConfig()
    if lg is not None:
        log = LogConfig(
            file=lg.get("file", str, None),
            level=lg.choice("level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        )
        lg.done()
    top.done()
    return mqtt, rest, log


def _read_components(data: Any, module_dir: Path, errors: list[str]) -> dict[str, Component]:
    components: dict[str, Component] = {}
    if data is None:
        return components
    top = _Section("components.conf", data, "", errors)
    for name in top.data:
        comp = top.sub(name)
        assert comp is not None
        ident = comp.get("id", int)
        cfg = comp.sub("config", required=True)
        comp.done()
        if cfg is None:
            continue
        protocol = cfg.choice("protocol", ("http", "https", "wasm"))
        endpoints = cfg.get("endpoints", dict)
        if isinstance(endpoints, dict):
            for ep, target in endpoints.items():
                if not isinstance(target, str) or not target:
                    cfg.error(f"must name a path or an exported function, got {json.dumps(target)}", f"endpoints.{ep}")
                if not ep or any(c.isspace() or c == "#" for c in ep):
                    cfg.error("an endpoint id may not be empty or hold spaces or '#'", f"endpoints.{ep}")
        if any(c.isspace() or c == "#" for c in name) or not name:
            top.error("a component name may not be empty or hold spaces or '#'", name)
        if protocol == "wasm":
            module_name = cfg.get("module", str)
            limits = WasmLimits()
            lim = cfg.sub("limits")
            if lim is not None:
                limits = WasmLimits(
                    timeout_ms=lim.positive("timeout_ms", int, 1000),
                    memory_mb=lim.positive("memory_mb", int, 64),
                    fuel=lim.get("fuel", int, None),
                    concurrency=lim.positive("concurrency", int, 4),
                )
                lim.done()
            module = Path()
            if module_name:
                module = Path(module_name) if Path(module_name).is_absolute() else module_dir / module_name
                if not module.is_file():
                    where = "" if Path(module_name).is_absolute() else (
                        f" (modules are looked up in {module_dir}: runtime.conf module_dir or RM_MODULE_DIR says where)")
                    cfg.error(f"module file not found: {module}{where}", "module")
            max_output = cfg.positive("max_output_bytes", int, MiB)
            cfg.done()
            components[name] = WasmComponent(name, ident, module, dict(endpoints or {}), limits, max_output or MiB)
        else:
            components[name] = HttpComponent(
                name=name,
                id=ident,
                protocol=protocol or "http",
                ip=cfg.host("ip"),
                port=cfg.port("port"),
                endpoints=dict(endpoints or {}),
                timeout_s=cfg.positive("timeout_s", float, 10.0),
                retries=cfg.get("retries", int, 2),
                max_output_bytes=cfg.positive("max_output_bytes", int, MiB) or MiB,
            )
            cfg.done()
    return components


def _read_load_balancer(data: Any, errors: list[str]) -> LoadBalancerConfig:
    if data is None:
        return LoadBalancerConfig(policy="local")
    s = _Section("load_balancer.conf", data, "", errors)
    has_url = "ip" in s.data or "endpoint" in s.data
    policy = s.choice("policy", POLICIES, "external" if has_url else "local")
    needed = _MISSING if policy == "external" else None
    lb = LoadBalancerConfig(
        policy=policy or "local",
        protocol=s.choice("protocol", ("http", "https"), "http"),
        ip=s.host("ip", needed) or "",
        port=s.port("port", needed) or 0,
        endpoint=s.get("endpoint", str, needed) or "",
        timeout_s=s.positive("timeout_s", float, 2.0),
        threshold=s.positive("threshold", float, 0.8),
    )
    s.done()
    return lb


def _read_nodes(data: Any, errors: list[str]) -> dict[str, PeerAddress]:
    nodes: dict[str, PeerAddress] = {}
    if data is None:
        return nodes
    top = _Section("nodes.conf", data, "", errors)
    for key in top.data:
        entry = top.sub(key)
        assert entry is not None
        ident = entry.get("id", (int, str))
        cfg = entry.sub("config", required=True)
        entry.done()
        if cfg is None:
            continue
        node = PeerAddress(
            id=str(ident if ident is not None else key),
            protocol=cfg.choice("protocol", ("http", "https"), "http"),
            ip=cfg.host("ip"),
            port=cfg.port("port"),
            endpoint=cfg.get("endpoint", str, "startrm"),
            token=cfg.secret("token"),
            timeout_s=cfg.positive("timeout_s", float, 30.0),
            forward=cfg.choice("forward", ("rest", "mqtt"), "rest"),
        )
        cfg.done()
        nodes[node.id] = node
    return nodes


def _default_dirs(config_dir: Path) -> tuple[Path, Path]:
    """Where modules and state are when runtime.conf does not say: `RM_MODULE_DIR`
    (else `runtimes/` beside the config directory) and `STATE_DIRECTORY` (what
    systemd's StateDirectory= sets; else the config directory)."""
    modules = os.environ.get("RM_MODULE_DIR")
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return (Path(modules).resolve() if modules else (config_dir.parent / "runtimes").resolve(),
            Path(state).resolve() if state else config_dir)


def _read_tracing(t: _Section | None) -> TracingConfig | None:
    """runtime.conf `tracing`, checked: None when absent (tracing off)."""
    if t is None:
        return None
    endpoint = t.get("otlp_endpoint", str)
    cfg = TracingConfig(
        otlp_endpoint=endpoint or "",
        sampling_ratio=t.get("sampling_ratio", float, 1.0),
        service_name=t.get("service_name", str, "runtime-manager"),
        export_interval_ms=t.positive("export_interval_ms", int, 1000),
        max_queue=t.positive("max_queue", int, 8192),
        headers=t.get("headers", dict, None),
    )
    t.done()
    if endpoint is not None and not (endpoint.startswith(("http://", "https://")) and len(endpoint) > 8):
        t.error(f"must be an http:// or https:// URL (OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces), "
                f"got {endpoint!r}", "otlp_endpoint")
    if not 0.0 <= cfg.sampling_ratio <= 1.0:
        t.error(f"must be from 0 to 1, got {cfg.sampling_ratio}", "sampling_ratio")
    if cfg.headers is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in cfg.headers.items()):
        t.error("must be an object of strings", "headers")
    return cfg


def _read_runtime(data: Any, config_dir: Path, errors: list[str]) -> RuntimeConfig:
    default_dir, default_state = _default_dirs(config_dir)
    if data is None:
        return RuntimeConfig(module_dir=default_dir, state_dir=default_state)
    s = _Section("runtime.conf", data, "", errors)
    node_id = s.get("node_id", (str, int), None)
    module_dir = s.get("module_dir", str, None)
    mdir = default_dir if module_dir is None else (config_dir / module_dir).resolve()
    state_dir = s.get("state_dir", str, None)
    sdir = default_state if state_dir is None else (config_dir / state_dir).resolve()
    orch = None
    o = s.sub("orchestrator")
    if o is not None:
        orch = OrchestratorConfig(
            realm=o.get("realm", str, "realm"),
            name=o.get("name", str, "") or str(node_id or os.uname().nodename),
            dialect=o.choice("dialect", ("silverline", "arts"), "silverline"),
            max_nmodules=o.positive("max_nmodules", int, 16),
            reg_timeout_s=o.positive("reg_timeout_s", float, 5.0),
            ka_interval_sec=o.get("ka_interval_sec", float, 60.0),
            state_file=o.get("state_file", str, "runtime_state.json"),
            channel_prefix=o.get("channel_prefix", str, None),
            migratable=o.get("migratable", bool, True),
            migrate_timeout_ms=o.positive("migrate_timeout_ms", int, 2000),
            on_stop=o.choice("on_stop", ("stop", "migrate"), "stop"),
            checkpoint_s=o.get("checkpoint_s", float, 0.0),
            module_memory_mb=o.positive("module_memory_mb", int, 64),
        )
        o.done()
    rt = RuntimeConfig(
        node_id=None if node_id is None else str(node_id),
        workers=s.positive("workers", int, 64),
        queue_depth=s.positive("queue_depth", int, 4096),
        task_timeout_ms=s.positive("task_timeout_ms", int, 30000),
        heartbeat_interval_ms=s.get("heartbeat_interval_ms", int, 30000),
        drain_timeout_s=s.positive("drain_timeout_s", float, 10.0),
        wasm_threads=s.positive("wasm_threads", int, 2),
        wasm_max_threads=s.positive("wasm_max_threads", int, 16),
        module_dir=mdir,
        state_dir=sdir,
        orchestrator=orch,
        tracing=_read_tracing(s.sub("tracing")),
        status_interval_ms=s.get("status_interval_ms", int, 1000),
        status_prefix=s.get("status_prefix", str, "rm/nodes"),
        group=s.get("group", str, ""),
        status_heartbeat_ms=s.get("status_heartbeat_ms", int, 5000 if s.data.get("group") else 1000),
        load_report_delta=s.get("load_report_delta", float, 0.25),
        presence_keepalive_s=s.get("presence_keepalive_s", int, 2),
        discover=s.get("discover", bool, False),
        dedupe_window=s.get("dedupe_window", int, 1000),
        http_port=s.port("http_port", None),
        publish_prefix=s.get("publish_prefix", str, "flows/"),
        dead_letter_topic=s.get("dead_letter_topic", str, None),
    )
    if rt.status_interval_ms < 0:
        s.error(f"must be 0 (off) or more, got {rt.status_interval_ms}", "status_interval_ms")
    if rt.dedupe_window < 0:
        s.error(f"must be 0 (off) or more, got {rt.dedupe_window}", "dedupe_window")
    if rt.group and (len(rt.group) > 64 or any(c in rt.group for c in "/+#") or rt.group.startswith("$")
                     or not rt.group.isprintable()):
        s.error(f"must be one topic level (no '/', '+', '#', at most 64 characters), got {rt.group!r}", "group")
    if rt.status_heartbeat_ms < 50 or rt.status_heartbeat_ms > 3_600_000:
        s.error(f"must be 50 to 3600000 ms, got {rt.status_heartbeat_ms}", "status_heartbeat_ms")
    if not 0 < rt.load_report_delta <= 10:
        s.error(f"must be more than 0 and at most 10, got {rt.load_report_delta}", "load_report_delta")
    if not 1 <= rt.presence_keepalive_s <= 3600:
        s.error(f"must be 1 to 3600 s, got {rt.presence_keepalive_s}", "presence_keepalive_s")
    if not rt.status_prefix or "#" in rt.status_prefix or "+" in rt.status_prefix or rt.status_prefix.startswith("$"):
        s.error(f"must be a plain topic name, got {rt.status_prefix!r}", "status_prefix")
    if "#" in rt.publish_prefix or "+" in rt.publish_prefix or rt.publish_prefix.startswith("$"):
        s.error(f"must be the start of a topic name (no '+' or '#', not '$…'), got {rt.publish_prefix!r}", "publish_prefix")
    if rt.dead_letter_topic is not None and topic_name_problem(rt.dead_letter_topic):
        s.error(f"{rt.dead_letter_topic!r} cannot be published to: it {topic_name_problem(rt.dead_letter_topic)}",
                "dead_letter_topic")
    s.done()
    if module_dir is not None and not mdir.is_dir():
        s.error(f"not a directory: {mdir}", "module_dir")
    if state_dir is not None and not sdir.is_dir():
        s.error(f"not a directory: {sdir}", "state_dir")
    return rt


def own_topic(topic: str, runtime: RuntimeConfig, mqtt: MqttConfig) -> str | None:
    """Which of the node's own protocols `topic` belongs to, or None: flows
    and dead letters never publish there."""
    def under(base: str) -> bool:
        return topic == base or topic.startswith(base + "/")

    if under(mqtt.topic):
        return f"the node's request topic ('{mqtt.topic}', comm.conf mqtt.topic) and those under it"
    if mqtt.result_topic and under(mqtt.result_topic):
        return f"the node's result topic ('{mqtt.result_topic}')"
    if under(runtime.status_prefix):
        return f"the nodes' statuses ('{runtime.status_prefix}/…', runtime.conf status_prefix)"
    if runtime.orchestrator is not None and (under(f"{runtime.orchestrator.realm}/proc")
                                             or under(f"{runtime.orchestrator.realm}/rm")):
        return f"the orchestrator protocol's ('{runtime.orchestrator.realm}/proc/…', '…/rm/…')"
    return None


def flow_rules(runtime: RuntimeConfig, mqtt: MqttConfig) -> FlowRules:
    """What flows are checked against besides components: the flow's time and
    where PUBLISH may go (under runtime.conf `publish_prefix`, never a topic of
    the node's own protocols)."""
    def publish_problem(topic: str) -> str | None:
        own = own_topic(topic, runtime, mqtt)
        if own:
            return f"is one of {own}"
        if not topic.startswith(runtime.publish_prefix):
            return (f"is outside '{runtime.publish_prefix}' (runtime.conf publish_prefix: where flows may publish; "
                    "\"\" for anywhere but the node's own topics)")
        return None

    return FlowRules(task_timeout_ms=runtime.task_timeout_ms, publish_problem=publish_problem)


def resolve_config_dir(flag: str | None) -> Path:
    """`--config-dir`, else `RM_CONFIG_DIR`, else `./config_files`."""
    return Path(flag or os.environ.get("RM_CONFIG_DIR") or "config_files").resolve()


def load_config(config_dir: str | Path) -> Config:
    cdir = Path(config_dir).resolve()
    if not cdir.is_dir():
        raise ConfigError([f"{cdir}: config directory not found"])
    errors: list[str] = []
    runtime = _read_runtime(_read_json(cdir / "runtime.conf", errors, required=False), cdir, errors)
    mqtt, rest, log = _read_comm(_read_json(cdir / "comm.conf", errors), errors)
    components = _read_components(_read_json(cdir / "components.conf", errors), runtime.module_dir, errors)
    lb = _read_load_balancer(_read_json(cdir / "load_balancer.conf", errors, required=False), errors)
    if runtime.dead_letter_topic is not None and own_topic(runtime.dead_letter_topic, runtime, mqtt):
        errors.append(f"runtime.conf: dead_letter_topic: {runtime.dead_letter_topic!r} is one of "
                      f"{own_topic(runtime.dead_letter_topic, runtime, mqtt)}")
    nodes = _read_nodes(_read_json(cdir / "nodes.conf", errors, required=False), errors)
    flows: dict[str, Flow] = {}
    flows_path = cdir / "flows.conf"
    if not flows_path.exists():
        errors.append(f"flows.conf: file not found in {cdir}")
    else:
        try:
            text = flows_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            errors.append(f"flows.conf: not UTF-8 text ({exc.reason} at byte {exc.start})")
            text = ""
        except OSError as exc:
            errors.append("flows.conf: is a directory, not a file" if isinstance(exc, IsADirectoryError)
                          else f"flows.conf: cannot read: {exc.strerror or exc}")
            text = ""
        parsed, flow_errors = parse_flows(text, "flows.conf")
        errors += flow_errors
        flows, flow_errors = resolve_flows(parsed, components, "flows.conf", flow_rules(runtime, mqtt))
        errors += flow_errors
    if errors:
        raise ConfigError(errors)
    n_wasm = sum(isinstance(c, WasmComponent) for c in components.values())
    summary = {
        "comm.conf": f"mqtt {mqtt.host}:{mqtt.port} topic '{mqtt.topic}' qos {mqtt.qos}; "
        f"rest {rest.host}:{rest.port}{rest.endpoint}",
        "components.conf": f"{len(components)} components ({n_wasm} wasm)",
        "flows.conf": f"{len(flows)} flows: {', '.join(flows)}",
        "load_balancer.conf": f"policy {lb.policy}" + (f" at {lb.url}" if lb.policy == "external" else ""),
        "nodes.conf": f"{len(nodes)} peers: {', '.join(nodes)}",
        "runtime.conf": f"node {runtime.node_id or '(unset)'}, {runtime.workers} workers, "
        f"queue {runtime.queue_depth}, modules in {runtime.module_dir}",
    }
    return Config(cdir, mqtt, rest, log, components, flows, lb, nodes, runtime, summary)
