"""`GET /metrics`: the Prometheus text format, read back with prometheus_client's
own parser, counting what really happened on a live node."""

from __future__ import annotations

import json

import requests
from conftest import ROOT, RmProcess, write_config
from helpers import free_port, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

FLOWS = "1\nTO component1 1\nPOST payload\n\nfail\nTO component1 fail\nGET\n"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_by_flow_entrypoint_and_outcome(tmp_path, broker, mock, processes):
    port = free_port()
    components = {"component1": {"id": 1, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port,
                                                     "endpoints": {"1": "endpoint1", "fail": "fail"}}}}
    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=port, flows=FLOWS, components=components,
                       lb={"policy": "local"}, runtime={"node_id": "1"})
    processes.append(RmProcess("serve", cfg).start())
    base = f"http://127.0.0.1:{port}"
    for _ in range(3):
        assert requests.post(f"{base}/startrm", json={"id_flow": "1", "payload": "p"}, timeout=10).status_code == 200
    assert requests.post(f"{base}/startrm", json={"id_flow": "fail"}, timeout=10).status_code == 502
    for flow in ("nope", "x" * 50):  # ids not in flows.conf share one label value
        assert requests.post(f"{base}/startrm", json={"id_flow": flow}, timeout=10).status_code == 404
    resp = requests.get(f"{base}/metrics", timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    got = samples(resp.text)

    def value(name: str, **labels: str) -> float | None:
        return got.get((name, tuple(sorted(labels.items()))))

    assert value("rm_requests_total", flow="1", entrypoint="rest", outcome="ok") == 3
    assert value("rm_requests_total", flow="fail", entrypoint="rest", outcome="component_error") == 1
    assert value("rm_requests_total", flow="(unknown)", entrypoint="rest", outcome="unknown_flow") == 2
    assert value("rm_flow_duration_seconds_count", flow="1") == 3
    assert value("rm_step_duration_seconds_count", component="component1", outcome="ok") == 3
    assert value("rm_step_duration_seconds_count", component="component1", outcome="error") == 1
    assert value("rm_placements_total", asked="none", chosen="home") == 6
    assert value("rm_flows_in_flight") == 0 and value("rm_workers") == 64
    assert value("rm_mqtt_connected") == 1 and value("rm_mqtt_connections_total") >= 1
    assert value("process_resident_memory_bytes") > 10e6 and value("process_cpu_seconds_total") > 0
    assert {labels for (name, labels) in got if name == "rm_peers"} >= {(("state", "healthy"),), (("state", "unknown"),)}


def test_an_mqtt_only_node_serves_health_status_and_metrics_on_http_port(tmp_path, broker, mock, processes, probe_factory):
    port = free_port()
    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, flows=FLOWS, lb={"policy": "local"},
                       runtime={"node_id": "1", "http_port": port},
                       components={"component1": {"id": 1, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port,
                                                                      "endpoints": {"1": "endpoint1", "fail": "fail"}}}})
    processes.append(RmProcess("rm_mqtt", cfg, "--log-level", "DEBUG").start())
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{base}/readyz", timeout=5).json()["ready"], 10, "the node to be ready")
    wait_for(lambda: "subscribed" in processes[0].log() or "taking requests" in processes[0].log(), 10, "the subscription")
    probe = probe_factory()
    answer = probe.request("1", "p", timeout=20)
    assert answer["status"] == "ok"
    assert requests.get(f"{base}/status", timeout=5).json()["by_entrypoint"] == {"mqtt": 1}
    got = samples(requests.get(f"{base}/metrics", timeout=5).text)
    assert got[("rm_requests_total", (("entrypoint", "mqtt"), ("flow", "1"), ("outcome", "ok")))] == 1
    # at DEBUG, one line per request: its id, flow, entry point, where it ran, outcome and time
    assert f"request {answer['request_id']} flow 1 via mqtt ran home: ok in " in processes[0].log()
    # a message that is no request is answered bad_request and counted like any result
    probe.client.publish("component_msg", b"{not json", qos=1).wait_for_publish(5)
    bad = ("rm_requests_total", (("entrypoint", "mqtt"), ("flow", "(none)"), ("outcome", "bad_request")))
    wait_for(lambda: samples(requests.get(f"{base}/metrics", timeout=5).text).get(bad) == 1, 10, "the bad request counted")
    status = requests.get(f"{base}/status", timeout=5).json()
    assert status["bad_request"] == 1 and status["last_errors"][0]["code"] == "bad_request"
    assert requests.get(f"{base}/ui", timeout=5).status_code == 200
    assert requests.post(f"{base}/startrm", json={"id_flow": "1"}, timeout=5).status_code == 404  # no flows here
    assert set(requests.get(f"{base}/openapi.json", timeout=5).json()["paths"]) == {
        "/health", "/livez", "/readyz", "/status", "/metrics", "/openapi.json", "/ui"}


def test_webassembly_runs_are_counted_by_component_and_outcome(tmp_path, broker, mock, processes):
    port = free_port()
    runtimes = ROOT / "runtimes"
    wasm = {name: {"id": 50 + i, "config": {"protocol": "wasm", "module": module, "endpoints": {"1": "_start"},
                                            **({"limits": limits} if limits else {})}}
            for i, (name, module, limits) in enumerate((("echo", "echo.wat", None), ("trap", "trap.wat", None),
                                                        ("loop", "loop.wat", {"timeout_ms": 100})))}
    flows = "echo\nTO echo 1\nPOST payload\n\ntrap\nTO trap 1\nGET\n\nloop\nTO loop 1\nGET\n"
    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=port, flows=flows, components=wasm,
                       lb={"policy": "local"}, runtime={"node_id": "1", "module_dir": str(runtimes)})
    processes.append(RmProcess("serve", cfg).start())
    base = f"http://127.0.0.1:{port}"
    for flow, status, times in (("echo", 200, 3), ("trap", 502, 2), ("loop", 504, 1)):
        for _ in range(times):
            assert requests.post(f"{base}/startrm", json={"id_flow": flow, "payload": "x"}, timeout=10).status_code == status
    got = samples(requests.get(f"{base}/metrics", timeout=5).text)
    assert got[("rm_wasm_runs_total", (("component", "echo"), ("outcome", "ok")))] == 3
    assert got[("rm_wasm_runs_total", (("component", "trap"), ("outcome", "trap")))] == 2
    assert got[("rm_wasm_runs_total", (("component", "loop"), ("outcome", "timeout")))] == 1


def test_a_burst_of_requests_makes_the_garbage_collector_run_rarely(tmp_path, broker, mock, processes, probe_factory):
    """What the node built while starting is set aside from the cyclic collector and
    young collections wait for many more objects than CPython's 700: a burst whose
    requests queue up (their objects all alive at once) no longer makes it run
    every few dozen requests (python_gc_collections_total, the standard metric)."""
    port = free_port()
    components = {"component1": {"id": 1, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port,
                                                     "endpoints": {"1": "endpoint1", "fail": "fail"}}}}
    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=port, flows=FLOWS, components=components,
                       lb={"policy": "local"}, runtime={"node_id": "1"}, topic="gc-burst")
    processes.append(RmProcess("serve", cfg).start())
    base = f"http://127.0.0.1:{port}"

    def collections() -> dict[str, float]:
        got = samples(requests.get(f"{base}/metrics", timeout=5).text)
        return {dict(labels)["generation"]: v for (name, labels), v in got.items() if name == "python_gc_collections_total"}

    before = collections()
    assert set(before) == {"0", "1", "2"}
    probe = probe_factory(topics=("gc-burst/result",))
    n = 1500
    for i in range(n):
        probe.client.publish("gc-burst", json.dumps({"id_flow": "1", "payload": "p" * 200, "request_id": f"b{i}"}), qos=0)
    probe.wait_messages(n, timeout=60)
    assert all(probe.results[f"b{i}"][0]["status"] == "ok" for i in range(n))
    after = collections()
    assert after["0"] - before["0"] <= 3, (before, after)  # at CPython's default threshold: dozens


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 30), st.sampled_from(["1", "2", "nope"]), st.floats(0, 5000), st.booleans()),
                max_size=400),
       st.integers(1, 50))
def test_the_last_minute_keeps_the_last_results_within_its_bound_and_counts_them_by_flow(results, size):
    """The status page's last minute (observe/recent.py) against a plain list
    holding the same: the last `size` results, those of the last 60 s counted
    per flow (unknown flow ids as `(unknown)`), p50 and p99 by nearest rank."""
    from runtime_manager.core.events import REQUEST_DONE, Events
    from runtime_manager.core.request import FlowRequest
    from runtime_manager.core.result import Result
    from runtime_manager.observe import recent

    now = [0.0]
    saved = recent.MAX_SAMPLES
    recent.MAX_SAMPLES = size
    try:
        events = Events()
        activity = recent.RecentActivity(events, {"1", "2"}, clock=lambda: now[0])
        kept: list[tuple[float, str, float, bool]] = []
        for step, flow, ms, ok in results:
            now[0] += step
            error = None if ok else {"code": "component_error", "message": "no"}
            events.emit(REQUEST_DONE, FlowRequest(flow), Result("r", flow, "1", error=error, elapsed_ms=ms))
            kept = ([*kept, (now[0], flow if flow in ("1", "2") else "(unknown)", ms, ok)])[-size:]
        got = activity.flows_last_minute()
    finally:
        recent.MAX_SAMPLES = saved
    want: dict[str, list] = {}
    for when, flow, ms, ok in kept:
        if when >= now[0] - recent.WINDOW_S:
            want.setdefault(flow, []).append((ms, ok))
    assert set(got) == set(want)
    for flow, items in want.items():
        durations = sorted(ms for ms, _ok in items)
        assert got[flow]["requests"] == len(items)
        assert got[flow]["errors"] == sum(1 for _ms, ok in items if not ok)
        assert got[flow]["p50_ms"] == round(durations[min(len(durations) - 1, max(0, int(0.5 * len(durations) + 0.999999) - 1))], 2)
