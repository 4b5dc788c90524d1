"""The documents that say how a node is: `GET /status` (for people and the
page), `GET /readyz` (whether it takes requests, and why not) and the status
it tells its peers over the broker (membership).

They read a running node through `NodeView`, the few things of a node they
need, so this module depends on the parts and not on the container.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..core.flows import natural_order
from ..core.lifecycle import Entrypoint, Service
from ..core.plans import explain
from ..core.topics import node_topic
from ..wasm.migratable import wasm_opt_version

WEDGED_S = 2.0  # the event loop silent this long: not ready

if TYPE_CHECKING:  # Flask and wasmtime only where a node uses them
    from ..cluster.peers import PeerTable
    from ..cluster.worker_loads import WorkerLoads
    from ..config import Config
    from ..engine import FlowEngine
    from ..entrypoints.rest import RestEntrypoint
    from ..entrypoints.takeover import SessionTakeover
    from ..mqtt.link import MqttLink
    from ..orchestrator.runtime import OrchestratorRuntime
    from .loop_watch import LoopWatch
    from .recent import RecentActivity


class NodeView(Protocol):
    """What the documents read of a node (any thread)."""

    config: Config
    engine: FlowEngine
    peers: PeerTable
    recent: RecentActivity
    watch: LoopWatch
    services: list[Service]
    link: MqttLink | None
    rest: RestEntrypoint | None
    orchestrator: OrchestratorRuntime | None
    takeover: SessionTakeover | None
    loads: WorkerLoads | None
    takes_mqtt: bool  # an MQTT entry point runs
    forwards_mqtt: bool  # peers may forward to it over MQTT
    worker: int | None  # its index under `serve --processes`
    workers: int
    started: float
    stopping: bool
    reloads: dict[str, Any]


def entrypoint_names(node: NodeView) -> list[str]:
    return [s.name for s in node.services if isinstance(s, Entrypoint)]


def readiness(node: NodeView) -> dict[str, Any]:
    """Whether this node takes requests, and why not (`GET /readyz`)."""
    reasons = []
    engine = node.engine
    silent = node.watch.silent_s()
    if silent > WEDGED_S:
        reasons.append(f"the event loop has not run for {silent:.1f} s (wedged or stopped)")
    if not engine.accepting:
        reasons.append("not accepting requests (starting or stopping)")
    if node.stopping:
        reasons.append("stopping: finishing the requests it took")
    if node.takes_mqtt and node.link is not None and not node.link.connected:
        reasons.append(f"not connected to the MQTT broker ({node.link.last_error or 'connecting'})")
    queue = engine.status()
    if queue["queued"] >= queue["queue_depth"]:
        reasons.append(f"queue full ({queue['queue_depth']} requests waiting)")
    return {"ready": not reasons, "reasons": reasons, "node": node.config.node_name}


_plans: dict[int, tuple[Any, dict[str, list[str]]]] = {}


def flow_plans(config: Any) -> dict[str, list[str]]:
    """Each flow's plan as `check --explain` prints it (made once per configuration)."""
    found = _plans.get(id(config))
    if found is None or found[0] is not config:
        _plans.clear()
        found = _plans[id(config)] = (config, {fid: explain(config.flows[fid])
                                               for fid in sorted(config.flows, key=natural_order)})
    return found[1]


def node_status(node: NodeView) -> dict[str, Any]:
    """This node as `GET /status` shows it."""
    config, engine = node.config, node.engine
    status = engine.status()
    status["pid"] = os.getpid()
    if node.worker is not None:
        status["worker"] = {"index": node.worker, "of": node.workers, "supervisor_pid": os.getppid()}
    status["uptime_s"] = round(time.time() - node.started, 1)
    status["loop_lag_ms"] = round(node.watch.lag_s * 1000, 1)
    status["entrypoints"] = entrypoint_names(node)
    status["config"] = {"dir": str(config.dir), "flows": sorted(config.flows, key=natural_order),
                        "reloads": node.reloads["count"], "last_reload": node.reloads["last"],
                        "plans": flow_plans(config)}
    if node.link is not None:
        link = node.link
        status["mqtt"] = {"connected": link.connected, "connections": link.connections,
                          "unacked_publishes": link.unacked, "last_error": link.last_error}
    status["placement"] = {"policy": config.load_balancer.policy, "load": round(engine.load(), 3),
                           "peers": node.peers.to_dict(time.monotonic())}
    if node.takeover is not None:  # the sessions of gone members this node took over, the last of each
        status["placement"]["takeovers"] = dict(node.takeover.taken_over)
    if node.engine.tracer is not None:
        status["tracing"] = node.engine.tracer.status()
    orch = node.orchestrator
    if orch is not None:
        status["orchestrator"] = {"runtime": orch.runtime_uuid, "name": orch.runtime_name,
                                  "registered": orch.orchestrated, "registration": orch.registration,
                                  "modules": orch.module_list(), "channel_topics": orch.channels.topics,
                                  "moves": list(orch.moves), "on_stop": orch.cfg.on_stop,
                                  "migratable": orch.cfg.migratable and wasm_opt_version() is not None}
    status["flows_last_minute"] = node.recent.flows_last_minute()
    status["last_errors"] = node.recent.last_errors()
    return status


def status_for_peers(node: NodeView) -> dict[str, Any]:
    """What this node tells its peers in its status (on the loop): the load of
    every worker of the node, how to reach it, whether it is ready."""
    engine, rt = node.engine, node.config.runtime
    in_flight, queued = engine.active, engine.pending() - engine.active
    if node.loads is not None:
        others = node.loads.others()
        in_flight, queued = in_flight + others[0], queued + others[1]
    n = node.workers
    doc: dict[str, Any] = {"in_flight": in_flight, "queued": queued, "capacity": rt.workers * n,
                           "queue_depth": rt.queue_depth * n, "processes": n,
                           "load": round((in_flight + queued) / (rt.workers * n), 3),
                           "flows": sorted(node.config.flows), "config_dir": str(node.config.dir),
                           "uptime_s": round(time.time() - node.started, 1), "ready": readiness(node)["ready"]}
    if node.rest is not None and node.rest.flows:  # not the watching endpoints of http_port
        rest = node.config.rest
        doc["rest"] = {"protocol": "http", "ip": rest.host, "port": node.rest.port, "endpoint": rest.endpoint}
    if node.forwards_mqtt:
        doc["mqtt_topic"] = node_topic(node.config.mqtt.topic, node.config.node_name)
        doc["mqtt_batches"] = True  # it takes forwards in batches (core/forward_batch.py)
    return doc
