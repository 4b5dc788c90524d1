"""`GET /metrics`: the node in the Prometheus text format (prometheus_client).

Counters and histograms are fed by the engine's events (`observe/events.py`),
never counted in several places; gauges are read from the node when scraped.
Labels stay few: a flow id not in flows.conf is counted as `(unknown)`, a
request that could not be read (no flow to speak of) as `(none)`, an outcome
is `ok` or an error code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..config import Config
from ..core.events import (
    FORWARDS_SENT,
    MODULE_ENDED,
    MODULE_REFUSED,
    MODULE_STARTED,
    REQUEST_DONE,
    REQUEST_REFUSED,
    STEP_DONE,
    WASM_RUN,
    Events,
)
from ..core.request import FlowRequest
from ..core.result import Result

CONTENT_TYPE = CONTENT_TYPE_LATEST
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    def __init__(self, flows: set[str], events: Events, status: Callable[[], dict[str, Any]]) -> None:
        self.flows = flows
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        GCCollector(registry=self.registry)  # python_gc_collections_total{generation}, python_gc_objects_collected_total
        self.requests = Counter("rm_requests", "Requests answered, by flow, entry point and outcome (ok or error code)",
                                ["flow", "entrypoint", "outcome"], registry=self.registry)
        self.flow_seconds = Histogram("rm_flow_duration_seconds", "Time from taking a request to its result",
                                      ["flow"], buckets=BUCKETS, registry=self.registry)
        self.step_seconds = Histogram("rm_step_duration_seconds", "Time of one component call in a flow",
                                      ["component", "outcome"], buckets=BUCKETS, registry=self.registry)
        self.placements = Counter("rm_placements", "Where requests ran, by policy asked and choice (home or peer)",
                                  ["asked", "chosen"], registry=self.registry)
        self.forward_failures = Counter("rm_forward_failures", "Forwards to peers that failed (then the next was tried)",
                                        registry=self.registry)
        self.forward_batches = Histogram("rm_forward_batch_requests", "Requests in each message of forwards sent to a "
                                         "peer over MQTT (count: messages; sum: requests)",
                                         buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.wasm_runs = Counter("rm_wasm_runs", "WebAssembly flow steps run, by component and outcome (ok, trap, "
                                 "timeout, out_of_fuel, out_of_memory, exit_code, too_large, bad_output)",
                                 ["component", "outcome"], registry=self.registry)
        self.modules_started = Counter("rm_orchestrator_modules_started", "Orchestrator modules started",
                                       registry=self.registry)
        self.modules_ended = Counter("rm_orchestrator_modules_ended", "Orchestrator modules ended, by reason",
                                     ["reason"], registry=self.registry)
        self.modules_refused = Counter("rm_orchestrator_modules_refused", "Module creates refused", registry=self.registry)
        self.registry.register(_NodeCollector(status))
        # each metric's labelled children, by their labels: `labels()` checks
        # and locks on every call (1.7 µs; five a request)
        self._children: dict[tuple[Any, ...], Any] = {}
        events.connect(REQUEST_DONE, self._on_request_done)
        events.connect(STEP_DONE, self._on_step_done)
        events.connect(REQUEST_REFUSED, self._on_request_refused)
        events.connect(FORWARDS_SENT, self.forward_batches.observe)
        events.connect(WASM_RUN, lambda component, outcome: self._child(self.wasm_runs, component, outcome).inc())
        events.connect(MODULE_STARTED, lambda _name: self.modules_started.inc())
        events.connect(MODULE_ENDED, lambda _name, reason: self.modules_ended.labels(reason[:40]).inc())
        events.connect(MODULE_REFUSED, lambda _why: self.modules_refused.inc())

    def reconfigure(self, config: Config) -> None:
        self.flows = set(config.flows)

    def _on_request_refused(self, via: str, result: Result) -> None:
        self.requests.labels("(none)", via, result.code or "bad_request").inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _on_request_done(self, req: FlowRequest, result: Result) -> None:
        flow = result.id_flow if result.id_flow in self.flows else "(unknown)"
        self._child(self.requests, flow, req.via, "ok" if result.ok else (result.code or "error")).inc()
        if result.elapsed_ms is not None:
            self._child(self.flow_seconds, flow).observe(result.elapsed_ms / 1000)
        if result.placement is not None:
            chosen = "home" if result.placement.chosen == "home" else "peer"
            self._child(self.placements, result.placement.asked, chosen).inc()
            if result.placement.tried:
                self.forward_failures.inc(len(result.placement.tried))

    def _on_step_done(self, component: str, seconds: float, ok: bool) -> None:
        self._child(self.step_seconds, component, "ok" if ok else "error").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _NodeCollector:
    """Gauges read from the node's status at each scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Any:
        st = self.status()
        for name, key, text in (("rm_queue_length", "queued", "Requests waiting for a worker"),
                                ("rm_flows_in_flight", "in_flight", "Flows running now"),
                                ("rm_workers", "workers", "Flows that may run at once"),
                                ("rm_queue_capacity", "queue_depth", "Requests that may wait")):
            yield GaugeMetricFamily(name, text, value=st.get(key, 0))
        mqtt = st.get("mqtt")
        if mqtt is not None:
            yield GaugeMetricFamily("rm_mqtt_connected", "1 while connected to the broker", value=int(mqtt["connected"]))
            yield CounterMetricFamily("rm_mqtt_connections", "Connections made to the broker (reconnects + 1)",
                                      value=mqtt["connections"])
        peers = GaugeMetricFamily("rm_peers", "Peers by state in this node's view", labels=["state"])
        states: dict[str, int] = {}
        for peer in st.get("placement", {}).get("peers", []):
            states[peer["state"]] = states.get(peer["state"], 0) + 1
        for state in ("healthy", "unknown", "silent", "offline", "failed"):
            peers.add_metric([state], states.get(state, 0))
        yield peers
        orch = st.get("orchestrator")
        if orch is not None:
            modules = GaugeMetricFamily("rm_orchestrator_modules", "Orchestrator modules by state", labels=["state"])
            modules.add_metric(["running"], len(orch["modules"]))
            yield modules
