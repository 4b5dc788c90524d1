"""Tracing: one request followed across two nodes, exported over OTLP/HTTP to a
receiver in this process that decodes what arrives with OpenTelemetry's own
protobuf schema (opentelemetry-proto)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from conftest import RmProcess, write_config
from helpers import free_port, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from runtime_manager.core.tracecontext import parse_traceparent
from runtime_manager.tracing.otlp import OtlpExporter, encode_request, encode_spans, label

ROOT = Path(__file__).resolve().parent.parent


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: every request decoded as an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                with receiver.lock:
                    receiver.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def spans(self) -> list[tuple[dict[str, object], object]]:
        """(resource attributes, span) for every span received."""
        out = []
        with self.lock:
            for req in self.requests:
                for rs in req.resource_spans:
                    resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        out += [(resource, span) for span in ss.spans]
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(v: object) -> object:
    kind = v.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(v, kind) if kind else None


def attrs(span: object) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in span.attributes}  # type: ignore[attr-defined]


# ----- the encoding, against OpenTelemetry's schema --------------------------------------------
class _RequestSpan:
    """What the encoder reads of a request's span."""

    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


attribute_values = st.one_of(st.text(max_size=40), st.integers(-(2**63), 2**63 - 1), st.booleans(),
                             st.floats(allow_nan=False))
attribute_dicts = st.dictionaries(st.text(min_size=1, max_size=20), attribute_values, max_size=6)
errors = st.one_of(st.none(), st.text(max_size=60))


@given(name=st.text(max_size=80), kind=st.integers(1, 5), start=st.integers(0, 2**64 - 1),
       end=st.integers(0, 2**64 - 1), parent=st.one_of(st.none(), st.binary(min_size=8, max_size=8)),
       attributes=attribute_dicts, error=errors,
       children=st.lists(st.tuples(st.text(max_size=30), st.integers(1, 5), attribute_dicts, attribute_dicts, errors),
                         max_size=4))
@settings(max_examples=300, deadline=None)
def test_any_request_span_encodes_to_what_opentelemetry_reads_back(name, kind, start, end, parent, attributes, error,
                                                                    children):
    """A request's span and the spans recorded inside it (each with attributes
    in its label and attributes of its own) read back as OpenTelemetry spans."""
    span = _RequestSpan(trace_id=bytes(range(16)), span_id=b"\x01" * 8, parent_id=parent, label=label(name, kind),
                        start_ns=start, attributes=attributes,
                        children=[(label(n, k, fixed), bytes([i + 2] * 8), start, end, own, err)
                                  for i, (n, k, fixed, own, err) in enumerate(children)])
    blob = encode_spans(span, end, error)
    decoded = ExportTraceServiceRequest.FromString(encode_request(b"\x0a\x00", b"\x0a\x02rm", [blob, blob]))
    spans = decoded.resource_spans[0].scope_spans[0].spans
    assert len(spans) == 2 * (1 + len(children)) and decoded.resource_spans[0].scope_spans[0].scope.name == "rm"
    got = spans[0]
    assert got.trace_id == bytes(range(16)) and got.span_id == b"\x01" * 8 and got.parent_span_id == (parent or b"")
    assert got.name == name.encode("utf-8", "replace").decode("utf-8") and got.kind == kind
    assert (got.start_time_unix_nano, got.end_time_unix_nano) == (start, end)
    assert attrs(got) == attributes
    assert (got.status.code, got.status.message) == ((2, error) if error is not None else (0, ""))
    for i, (n, k, fixed, own, err) in enumerate(children):
        child = spans[1 + i]
        assert child.trace_id == bytes(range(16)) and child.span_id == bytes([i + 2] * 8)
        assert child.parent_span_id == b"\x01" * 8 and child.name == n.encode("utf-8", "replace").decode("utf-8")
        assert child.kind == k and attrs(child) == {**fixed, **own}
        assert (child.status.code, child.status.message) == ((2, err) if err is not None else (0, ""))


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_traceparent_is_read_or_refused(value):
    parsed = parse_traceparent(value)
    assert parsed is None or (len(parsed[0]) == 16 and len(parsed[1]) == 8 and any(parsed[0]) and any(parsed[1]))


def test_traceparents_as_the_w3c_spec_writes_them():
    good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_traceparent(good) == (bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"),
                                       bytes.fromhex("00f067aa0ba902b7"), True)
    assert parse_traceparent(good[:-2] + "00")[2] is False
    assert parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later") is not None
    for bad in ("", good[:-1], good.replace("4bf9", "xyz9"), "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", "ff" + good[2:], good + "-extra"):
        assert parse_traceparent(bad) is None, bad


# ----- one request across two nodes ---------------------------------------------------------------
FLOWS = "traced\nTO upper 1\nPOST payload\nTO component1 1\nPOST result1\n"


def _nodes(tmp_path: Path, broker, mock, receiver: OtlpReceiver, ratio: float = 1.0,
           forward: str = "rest") -> tuple[int, int]:
    port1, port2 = free_port(), free_port()
    nodes = {str(i): {"id": i, "config": {"protocol": "http", "ip": "127.0.0.1", "port": p, "endpoint": "startrm",
                                          "forward": forward}}
             for i, p in ((1, port1), (2, port2))}
    # over MQTT, node 1 learns node 2's request topic from its status
    statuses = {"status_interval_ms": 0} if forward == "rest" else {
        "status_interval_ms": 200, "status_prefix": f"rm/tracing-{uuid.uuid4().hex[:6]}"}
    upper = {"upper": {"id": 4, "config": {"protocol": "wasm", "module": "upper.wat", "endpoints": {"1": "_start"},
                                           "limits": {"timeout_ms": 1000, "memory_mb": 32}}}}
    tracing = {"otlp_endpoint": receiver.endpoint, "sampling_ratio": ratio, "export_interval_ms": 200}
    for i, port in (("1", port1), ("2", port2)):
        # node 1 asks node 2's load balancer answer (as an original node would) and forwards there
        lb = {"protocol": "http", "ip": "127.0.0.1", "port": port2, "endpoint": "lb/id_node"} if i == "1" else None
        write_config(tmp_path / f"n{i}", mock.port, broker.port, rest_port=port, flows=FLOWS, components=upper,
                     nodes=nodes, lb=lb, runtime={"node_id": i, "module_dir": str(ROOT / "runtimes"),
                                                 **statuses, "tracing": tracing})
    return port1, port2


@pytest.mark.parametrize("forward", ["rest", "mqtt"])
def test_a_forwarded_request_is_one_trace_across_two_nodes(tmp_path, broker, mock, processes, forward):
    """Over REST the context travels in the `traceparent` header; over MQTT, in
    the request's entry of the batch of forwards."""
    receiver = OtlpReceiver()
    try:
        port1, _ = _nodes(tmp_path, broker, mock, receiver, forward=forward)
        n1 = RmProcess("serve", tmp_path / "n1", "--log-level", "DEBUG").start()
        n2 = RmProcess("serve", tmp_path / "n2").start()
        processes += [n1, n2]
        if forward == "mqtt":
            wait_for(lambda: any(p.get("mqtt_batches") for p in requests.get(
                f"http://127.0.0.1:{port1}/status", timeout=5).json()["placement"]["peers"]), 10, "node 2's status")
        mock.traceparents.clear()
        answer = requests.post(f"http://127.0.0.1:{port1}/startrm", json={"id_flow": "traced", "payload": "hi"},
                               timeout=10).json()
        assert answer["status"] == "ok" and answer["node"] == "2", answer
        trace_id = answer["trace_id"]
        assert len(trace_id) == 32
        wait_for(lambda: len([s for _, s in receiver.spans() if s.trace_id.hex() == trace_id]) >= 10, 10,
                 "the spans of both nodes")
        spans = [(r, s) for r, s in receiver.spans() if s.trace_id.hex() == trace_id]
        by_node: dict[object, list] = {}
        for resource, span in spans:
            by_node.setdefault(resource["service.instance.id"], []).append(span)
        assert set(by_node) == {"1", "2"}
        ids = {s.span_id for _, s in spans}
        roots = [s for _, s in spans if not s.parent_span_id]
        assert len(roots) == 1 and roots[0].name == "flow traced" and roots[0] in by_node["1"]
        assert all(s.parent_span_id in ids for _, s in spans if s.parent_span_id)  # one tree
        names1 = {s.name for s in by_node["1"]}
        assert {"flow traced", "accept", "placement", "forward to node 2", "result"} <= names1
        forward_by, forward = forward, next(s for s in by_node["1"] if s.name == "forward to node 2")
        root2 = next(s for s in by_node["2"] if s.name == "flow traced")
        # under node 1's forward: SERVER over REST, CONSUMER over MQTT
        assert root2.parent_span_id == forward.span_id and root2.kind == (2 if forward_by == "rest" else 5)
        wasm = next(s for s in by_node["2"] if s.name == "step 1 upper")
        assert attrs(wasm)["rm.wasm.memory_mb"] == 32 and attrs(wasm)["rm.wasm.timeout_ms"] == 1000
        http = next(s for s in by_node["2"] if s.name == "step 2 component1")
        assert http.kind == 3 and attrs(http)["http.request.method"] == "POST"
        # the component got the context of its own step
        assert f"00-{trace_id}-{http.span_id.hex()}-01" in mock.traceparents
        assert all(s.parent_span_id == root2.span_id for s in (wasm, http))
        # the request's log line names its trace
        assert any(f"trace {trace_id}" in line for line in n1.log().splitlines() if "flow traced" in line), n1.log()
    finally:
        receiver.close()


def test_a_request_with_a_traceparent_joins_its_trace_and_a_bad_one_starts_another(tmp_path, broker, mock,
                                                                                    processes):
    receiver = OtlpReceiver()
    try:
        port1, _ = _nodes(tmp_path, broker, mock, receiver, ratio=0.0)
        processes += [RmProcess("serve", tmp_path / "n1").start(), RmProcess("serve", tmp_path / "n2").start()]
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        answer = requests.post(f"http://127.0.0.1:{port1}/startrm", json={"id_flow": "traced", "payload": "x"},
                               headers={"traceparent": parent}, timeout=10).json()
        assert answer["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
        # all of its spans, both nodes' (11): the count below must not grow with late ones
        wait_for(lambda: len(receiver.spans()) >= 11, 10, "the spans")
        root = next(s for r, s in receiver.spans() if s.name == "flow traced" and r["service.instance.id"] == "1")
        assert root.parent_span_id == bytes.fromhex("b7ad6b7169203331")  # sampled by its parent, whatever the ratio
        # a parent that says "not sampled", and a broken one: with sampling_ratio 0, nothing is exported
        before = len(receiver.spans())
        for tp in (parent[:-2] + "00", "00-nonsense"):
            answer = requests.post(f"http://127.0.0.1:{port1}/startrm", json={"id_flow": "traced", "payload": "x"},
                                   headers={"traceparent": tp}, timeout=10).json()
            assert answer["status"] == "ok" and len(answer["trace_id"]) == 32
        assert answer["trace_id"] != "0af7651916cd43dd8448eb211c80319c"
        status = requests.get(f"http://127.0.0.1:{port1}/status", timeout=5).json()
        time.sleep(0.6)  # three export intervals: anything exported would have come
        assert len(receiver.spans()) == before == 11 and status["tracing"]["sampling_ratio"] == 0.0
        assert status["tracing"]["spans_exported"] == 5 and status["tracing"]["spans_queued"] == 0
    finally:
        receiver.close()


def test_an_mqtt_request_carries_its_traceparent_as_a_user_property(tmp_path, broker, mock, processes):
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    receiver = OtlpReceiver()
    try:
        _nodes(tmp_path, broker, mock, receiver)
        comm = json.loads((tmp_path / "n2" / "comm.conf").read_text())
        comm["mqtt"]["protocol"] = "5"
        (tmp_path / "n2" / "comm.conf").write_text(json.dumps(comm))
        processes.append(RmProcess("serve", tmp_path / "n2").start())
        got: list[bytes] = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.on_message = lambda _c, _u, m: got.append(m.payload)
        client.connect("127.0.0.1", broker.port)
        client.subscribe(comm["mqtt"].get("result_topic") or f"{comm['mqtt']['topic']}/result")
        client.loop_start()
        try:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("traceparent", "00-11111111111111111111111111111111-2222222222222222-01")]
            wait_for(lambda: client.is_connected(), 5, "connected")
            client.publish(comm["mqtt"]["topic"], json.dumps({"id_flow": "traced", "payload": "m"}), qos=1,
                           properties=props)
            wait_for(lambda: got, 10, "the result")
        finally:
            client.loop_stop()
            client.disconnect()
        assert json.loads(got[0])["trace_id"] == "1" * 32
        wait_for(lambda: any(s.name == "flow traced" for _, s in receiver.spans()), 10, "the spans")
        root = next(s for _, s in receiver.spans() if s.name == "flow traced")
        assert root.parent_span_id == bytes.fromhex("2" * 16) and root.kind == 5  # CONSUMER
    finally:
        receiver.close()


# ----- the exporter: bounded, batched, never in the requests' way -----------------------------------
def _exporter_run(endpoint: str, requests_of_spans: int, max_queue: int, interval_s: float = 0.05) -> OtlpExporter:
    """Add `requests_of_spans` request spans (1 + 2 inside each) to an exporter
    on a loop of its own, let it send, stop it; the exporter, for its counts."""
    import asyncio

    from runtime_manager.http.client import HttpClient
    from runtime_manager.tracing.spans import Tracer

    async def run() -> OtlpExporter:
        http = HttpClient()
        exporter = OtlpExporter(endpoint, {"service.name": "t"}, interval_s, max_queue)
        exporter.start(http)
        tracer = Tracer.__new__(Tracer)
        tracer.exporter, tracer.threshold = exporter, 1 << 64
        for i in range(requests_of_spans):
            span = tracer.start_trace(None)
            span.label = label("flow t", 5)
            span.attributes = {"rm.request_id": f"r{i}"}
            span.record(label("accept", 1), span.child_id(), span.start_ns)
            span.record(label("result", 1), span.child_id(), span.start_ns, error="broken")
            span.end()
        await asyncio.sleep(min(interval_s * 3, 0.3))
        await exporter.close(2.0)
        await http.stop()
        return exporter

    return asyncio.run(run())


def test_the_exporter_sends_every_span_in_batches_and_counts_them():
    receiver = OtlpReceiver()
    try:
        exporter = _exporter_run(receiver.endpoint, 1000, max_queue=10_000)
        spans = receiver.spans()
        assert len(spans) == 3000 and exporter.counts()["spans_exported"] == 3000
        assert len(receiver.requests) <= 3, "spans go in batches, not one request each"
        assert {s.name for _, s in spans} == {"flow t", "accept", "result"}
        assert sum(1 for _, s in spans if s.status.code == 2 and s.status.message == "broken") == 1000
    finally:
        receiver.close()


def test_an_absent_collector_costs_spans_not_requests_and_the_queue_stays_bounded():
    exporter = _exporter_run(f"http://127.0.0.1:{free_port()}/v1/traces", 500, max_queue=300, interval_s=10)
    counts = exporter.counts()
    # 1,500 spans for a queue of 300: the oldest dropped as they came, the rest failed at the stop
    assert counts["spans_exported"] == 0 and counts["spans_queued"] == 0
    assert counts["spans_dropped"] + counts["spans_failed"] == 1500 and 0 < counts["spans_failed"] <= 300
    assert "HttpConnectionError" in (counts["last_error"] or "")
