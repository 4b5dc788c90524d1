"""The flows language beyond TO/GET/POST: conditions, parallel blocks, options
of a request, sub-flows, PUBLISH, RETURN, FAIL, ON ERROR, dead letters; what
is checked at load; and the flows of before, unchanged to the byte."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import write_config
from golden_flows import golden
from helpers import InProcessNode, wait_for
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mock_services import MockServices

from runtime_manager.config import load_config
from runtime_manager.core.errors import ConfigError
from runtime_manager.core.flows import FlowRules, parse_flows, resolve_flows
from runtime_manager.core.request import FlowRequest
from runtime_manager.program import compare

HERE = Path(__file__).resolve().parent
EXTRA = {
    "sensor": {"id": 20, "config": {"protocol": "http", "ip": "127.0.0.1", "port": 0,
                                    "endpoints": {"read": "read", "alarm": "alarm", "log": "log", "slow": "slow",
                                                  "flaky": "flaky", "fail": "fail", "hang": "hang", "notify": "notify"}}},
}


@pytest.fixture
def node(tmp_path: Path, mock: MockServices):
    made: list[InProcessNode] = []

    def make(flows: str, runtime: dict | None = None, broker_port: int = 1) -> InProcessNode:
        extra = {k: {**v, "config": {**v["config"], "port": mock.port}} for k, v in EXTRA.items()}
        cfg = write_config(tmp_path / f"cfg{len(made)}", mock.port, broker_port=broker_port, flows=flows,
                           components=extra, runtime=runtime)
        n = InProcessNode(load_config(cfg)).start()
        made.append(n)
        return n

    yield make
    for n in made:
        n.kill()


def run(n: InProcessNode, flow: str, payload=None) -> dict:
    return n.run(FlowRequest(flow, payload), timeout=20)


def calls(mock: MockServices, path: str) -> int:
    return mock.calls.get(path, 0)


# ----- the flows of before -------------------------------------------------------------------------
def test_the_original_and_the_shipped_flows_answer_byte_for_byte_as_before(tmp_path):
    """test/golden/flows_results.json: every flow of both files, five payloads
    each, run on the tree before the language grew."""
    expected = json.loads((HERE / "golden" / "flows_results.json").read_text())
    assert golden(tmp_path) == expected


def test_the_flows_of_before_run_as_plain_lists(tmp_path, mock):
    """Flows of TO, GET and POST only take the engine's list path, as before."""
    config = load_config(write_config(tmp_path / "original", mock.port))
    assert config.flows and all(f.plain and f.catch is None for f in config.flows.values())
    assert not load_config(write_config(tmp_path / "optioned", mock.port, flows="1\nTO component1 1\nGET RETRY 1\n")
                           ).flows["1"].plain


# ----- conditions ----------------------------------------------------------------------------------
ROUTE = """route
TO sensor read
POST payload
IF result1.payload[0].temp > 30
  TO sensor alarm
  POST BODY {"temp": result1.payload[0].temp, "site": payload.site}
ELSE
  TO sensor log
  POST result1.payload[0]
END
RETURN result1.payload[0].temp
"""


def test_a_condition_routes_by_threshold_and_the_flow_returns_one_value(node, mock):
    n = node(ROUTE)
    hot = run(n, "route", {"temp": 35, "site": "north"})
    assert hot["status"] == "ok" and hot["result"] == 35 and "results" not in hot
    assert (calls(mock, "alarm"), calls(mock, "log")) == (1, 0)
    assert ("alarm", {"temp": 35, "site": "north"}) in mock.bodies
    cold = run(n, "route", {"temp": 12.5, "site": "south"})
    assert cold["result"] == 12.5 and (calls(mock, "alarm"), calls(mock, "log")) == (1, 1)


def test_a_condition_on_a_missing_field_or_unlike_values_is_a_located_error(node):
    n = node(ROUTE)
    missing = run(n, "route", {"site": "x"})
    assert missing["status"] == "error" and missing["error"]["code"] == "component_error"
    assert "result1.payload[0].temp: no field 'temp'" in missing["error"]["message"]
    text = run(n, "route", {"temp": "hot", "site": "x"})
    assert text["error"]["code"] == "flow_failed"
    assert "condition on line 4 of flow 'route'" in text["error"]["message"]
    assert "cannot order a string ('hot') and a number (30)" in text["error"]["message"]


@pytest.mark.parametrize(("left", "op", "right", "holds"), [
    (1, "==", 1.0, True), (True, "==", 1, False), ("a", "!=", "b", True), ([1, {"a": None}], "==", [1, {"a": None}], True),
    (3, "<", 4, True), ("b", ">=", "a", True), ("x", "in", ["x", "y"], True), (1, "in", [True], False),
    ("ell", "in", "hello", True), ("k", "in", {"k": 1}, True), (None, "==", None, True),
])
def test_comparisons_are_jsons(left, op, right, holds):
    assert compare(left, op, right) is holds


@pytest.mark.parametrize(("left", "op", "right"), [(1, "<", "2"), (None, ">", 0), (True, "<", 2), (1, "in", 5)])
def test_values_that_do_not_compare_say_so(left, op, right):
    with pytest.raises(TypeError):
        compare(left, op, right)


def test_exists_and_missing(node, mock):
    n = node("""check
IF payload.id missing
  FAIL "an id is needed"
END
TO sensor log
POST BODY {"id": payload.id}
RETURN payload.id
""")
    assert run(n, "check", {"id": 7})["result"] == 7
    refused = run(n, "check", {"name": "x"})
    assert refused["error"]["code"] == "flow_failed"
    assert refused["error"]["message"] == "an id is needed (FAIL on line 3 of flow 'check')"
    assert calls(mock, "log") == 1


# ----- parallel blocks -----------------------------------------------------------------------------
def test_a_parallel_block_runs_its_requests_at_once_numbered_as_written(node, mock):
    mock.slow_ms = 300
    n = node("""fan
PARALLEL
  TO sensor slow
  POST BODY {"which": "a"}
  POST BODY {"which": "b"}
  TO component1 1
  POST payload
END
TO sensor log
POST BODY {"a": result1.which, "b": result2.which, "c": result3.payload}
""")
    started = time.monotonic()
    res = run(n, "fan", 5)
    assert res["status"] == "ok" and time.monotonic() - started < 2
    assert mock.peak_in_flight >= 2, "the two slow requests were in flight together"
    assert [r["endpoint"] for r in res["results"]] == ["slow", "slow", "endpoint1", "log"]
    assert res["results"][3]["a"] == "a"  # POST BODY sends the object itself (the service echoes its fields)
    assert ("log", {"a": "a", "b": "b", "c": [5]}) in mock.bodies


def test_one_failure_fails_the_block_unless_the_request_is_optional(node, mock):
    n = node("""strict
PARALLEL
  TO sensor hang
  GET
  TO sensor fail
  GET
END

lenient
PARALLEL
  TO sensor fail
  GET OPTIONAL
  TO sensor read
  POST payload
END
""")
    started = time.monotonic()
    strict = run(n, "strict")
    assert strict["status"] == "error" and strict["error"]["code"] == "component_error"
    assert "HTTP 500" in strict["error"]["message"] and time.monotonic() - started < 5, "the hanging one was cancelled"
    lenient = run(n, "lenient", {"k": 1})
    assert lenient["status"] == "ok" and lenient["results"][0] is None and lenient["results"][1]["payload"] == [{"k": 1}]


# ----- options of a request ------------------------------------------------------------------------
def test_a_flaky_service_is_retried_with_backoff(node, mock):
    n = node("""flaky
TO sensor flaky
GET RETRY 2 BACKOFF 50ms

once
TO sensor flaky
GET RETRY 1 BACKOFF 10ms
""")
    mock.flaky_failures = 2
    started = time.monotonic()
    ok = run(n, "flaky")
    assert ok["status"] == "ok" and calls(mock, "flaky") == 3 and time.monotonic() - started >= 0.15  # 50 + 100 ms
    mock.calls.clear()
    mock.flaky_failures = 5
    failed = run(n, "once")
    assert failed["error"]["code"] == "component_error" and calls(mock, "flaky") == 2


def test_a_step_timeout_ends_the_attempt_within_the_flows_time(node):
    n = node("""t
TO sensor hang
GET TIMEOUT 200ms RETRY 1 BACKOFF 10ms
""")
    started = time.monotonic()
    res = run(n, "t")
    assert res["error"]["code"] == "timeout" and "within 200 ms (its TIMEOUT)" in res["error"]["message"]
    assert res["error"]["step"] == 1 and 0.35 < time.monotonic() - started < 3


# ----- sub-flows, ON ERROR -------------------------------------------------------------------------
def test_a_sub_flow_runs_with_a_value_as_its_payload(node, mock):
    n = node("""outer
RUN inner payload.reading
TO sensor log
POST BODY {"normalized": result1}

inner
TO sensor read
POST payload
RETURN result1.payload[0]
""")
    res = run(n, "outer", {"reading": {"c": 21}})
    assert res["status"] == "ok" and res["results"][0] == {"c": 21}
    assert ("log", {"normalized": {"c": 21}}) in mock.bodies


def test_on_error_can_answer_fail_with_its_own_error_or_let_the_failure_stand(node, mock):
    n = node("""recover
TO sensor fail
GET
ON ERROR
  TO sensor notify
  POST BODY {"what": error.message, "code": error.code, "step": error.step}
  RETURN {"fallback": true, "code": error.code}
END

chosen
TO sensor fail
GET
ON ERROR
  FAIL "the sensor is down"
END

stands
TO sensor fail
GET
ON ERROR
  TO sensor notify
  POST error.code
END
""")
    recovered = run(n, "recover")
    assert recovered["status"] == "ok" and recovered["result"] == {"fallback": True, "code": "component_error"}
    note = next(body for path, body in mock.bodies if path == "notify")
    assert note["code"] == "component_error" and note["step"] == 1 and "HTTP 500" in note["what"]
    chosen = run(n, "chosen")
    assert chosen["error"]["code"] == "flow_failed" and chosen["error"]["message"].startswith("the sensor is down")
    stands = run(n, "stands")
    assert stands["error"]["code"] == "component_error" and calls(mock, "notify") == 2


# ----- PUBLISH and the dead letters, on a real broker ------------------------------------------------
def test_publish_and_dead_letters_reach_the_broker(node, broker):
    got: list[tuple[str, dict, bool]] = []
    lock = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="lang-sub")
    sub.on_connect = lambda c, *a: (c.subscribe("flows/#", qos=1), c.subscribe("dead/letters", qos=1))
    sub.on_subscribe = lambda *a: lock.set()
    sub.on_message = lambda c, u, m: got.append((m.topic, json.loads(m.payload), m.retain))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    try:
        assert lock.wait(10)
        n = node("""alert
TO sensor read
POST payload
IF result1.payload[0].temp >= 30
  PUBLISH flows/alerts/hot {"temp": result1.payload[0].temp} QOS 1
END

broken
TO sensor fail
GET
""", runtime={"dead_letter_topic": "dead/letters"}, broker_port=broker.port)
        assert run(n, "alert", {"temp": 31})["status"] == "ok"
        assert run(n, "alert", {"temp": 3})["status"] == "ok"
        failed = run(n, "broken", {"x": 1})
        assert failed["status"] == "error"
        wait_for(lambda: len(got) >= 2, 10, "the alert and the dead letter")
        time.sleep(0.3)
        assert [g for g in got if g[0] == "flows/alerts/hot"] == [("flows/alerts/hot", {"temp": 31}, False)]
        letters = [g[1] for g in got if g[0] == "dead/letters"]
        assert len(letters) == 1 and letters[0]["request"]["payload"] == {"x": 1}
        assert letters[0]["request"]["id_flow"] == "broken" and letters[0]["error"] == failed["error"]
    finally:
        sub.loop_stop()
        sub.disconnect()


# ----- checked at load -----------------------------------------------------------------------------
def load_errors(tmp_path: Path, mock: MockServices, flows: str, runtime: dict | None = None) -> list[str]:
    extra = {k: {**v, "config": {**v["config"], "port": mock.port}} for k, v in EXTRA.items()}
    cfg = write_config(tmp_path / "bad", mock.port, flows=flows, components=extra, runtime=runtime)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    return err.value.errors


@pytest.mark.parametrize(("flows", "expected"), [
    ("x\nTO sensor read\nIF payload.t > 3\n  GET\nEND\nPOST result1\n",
     "flows.conf:6:1: result1 may not exist here: request 1 runs only inside IF (line 3)"),
    ("x\nTO sensor read\nIF payload.t > 3\n  GET\nELSE\n  FAIL\nEND\nPOST result1\n", None),  # the ELSE ends the flow
    ("x\nPARALLEL\n  TO sensor read\n  GET\n  POST result1\nEND\n",
     "flows.conf:5:3: result1 comes from the same PARALLEL block (line 2)"),
    ("x\nTO sensor read\nPOST error.message\n", "flows.conf:3:1: error.message: `error` is known only inside ON ERROR"),
    ("x\nRUN y\n\ny\nRUN z\n\nz\nRUN x\n", "RUN x: flows would run each other for ever (x -> y -> z -> x)"),
    ("x\nRUN nope\n", "flows.conf:2:5: RUN: unknown flow 'nope'"),
    ("x\nPUBLISH component_msg/out payload\n", "flows.conf:2:9: PUBLISH: topic 'component_msg/out' is one of the node's request topic"),
    ("x\nPUBLISH elsewhere/out payload\n", "flows.conf:2:9: PUBLISH: topic 'elsewhere/out' is outside 'flows/'"),
    ("x\nPUBLISH flows/+/out payload\n", "holds a wildcard"),
    ("x\nTO sensor read\nGET TIMEOUT 40s\n", "flows.conf:3:1: TIMEOUT 40000 ms is longer than the flow may take"),
    ("x\nTO sensor read\nGET RETRY 11\n", "flows.conf:3:11: RETRY takes a whole number from 0 to 10, not 11"),
    ("x\nTO sensor read\nGET\nON ERROR\n  FAIL\nEND\nGET\n", "flows.conf:4:1: ON ERROR must come last in a flow"),
    ("x\nTO sensor read\nGET\nON ERROR\n  POST result1\nEND\n", "flows.conf:5:3: result1 may not exist in ON ERROR"),
    ("x\nTO sensor read\nGET\nRETURN result1\nGET\n", "flows.conf:5:1: this step can never run"),
    ("x\nTO sensor read\nIF payload > 1\n  GET\n\n  GET\nEND\n", "flows.conf:5:1: a blank line inside a block"),
    ("x\nTO sensor read\nGET\nEND\n", "flows.conf:4:1: END without a block to end"),
    ("x\nTO sensor read\nIF payload\nEND\n", "flows.conf:3:11: unexpected end of line (expected ==, !="),
    ("x\nTO sensor read\nGET BACKOFF 3\n", "flows.conf:3:13: unexpected '3' (expected a time such as 200ms or 2s)"),
    ("x\nPARALLEL\n  PUBLISH flows/a payload\n  TO sensor read\n  GET\nEND\n",
     "flows.conf:3:3: only TO, GET, POST and RUN go in a PARALLEL block"),
    ("x\n" + "IF payload == 1\n" * 9 + "GET\n" + "END\n" * 9, "blocks nest 8 deep at most"),
])
def test_what_can_be_checked_is_checked_at_load_with_line_and_column(tmp_path, mock, flows, expected):
    if expected is None:
        extra = {k: {**v, "config": {**v["config"], "port": mock.port}} for k, v in EXTRA.items()}
        load_config(write_config(tmp_path / "good", mock.port, flows=flows, components=extra))
        return
    errors = load_errors(tmp_path, mock, flows)
    assert any(expected in e for e in errors), errors


def test_publish_prefix_and_dead_letter_topic_are_configuration(tmp_path, mock):
    errors = load_errors(tmp_path, mock, "x\nPUBLISH flows/out payload\n",
                         runtime={"publish_prefix": "site/", "dead_letter_topic": "component_msg/result"})
    assert any("PUBLISH: topic 'flows/out' is outside 'site/'" in e for e in errors), errors
    assert any(e.startswith("runtime.conf: dead_letter_topic: 'component_msg/result' is one of") for e in errors), errors


# ----- generated flows: they load and run, or are refused with a place -------------------------------
CLEAN_VALUES = st.sampled_from(["payload", "payload.a", "payload.items[0]", "result1", "result1.payload", "3", '"s"',
                                "[1, 2]", "true", "null", '{"k": payload.a}'])
VALUES = st.one_of(CLEAN_VALUES, st.sampled_from(["result2.payload", "result3", "error.message", "nope"]))


def _requests(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just("GET"), st.builds(lambda v: f"POST {v}", values), st.builds(lambda v: f"POST BODY {v}", values),
        st.sampled_from(["GET RETRY 1 BACKOFF 1ms", "GET OPTIONAL", "GET TIMEOUT 500ms", "RUN g2", "RUN g2 payload.a",
                         "TO sensor read", "TO sensor fail", "TO component1 1"]))


def _simple(values: st.SearchStrategy[str], noisy: bool) -> st.SearchStrategy[str]:
    lines = [_requests(values), st.builds(lambda v: f"PUBLISH flows/g {v}", values)]
    if noisy:
        lines += [st.builds(lambda v: f"RETURN {v}", values), st.just('FAIL "no"'),
                  st.sampled_from(["END", "", "ELSE", "POTS payload", "TO nowhere 1", "TO sensor 9", "RUN g1"])]
    return st.one_of(*lines)


def _block(depth: int, noisy: bool) -> st.SearchStrategy[list[str]]:
    values = VALUES if noisy else CLEAN_VALUES
    lines = st.lists(_simple(values, noisy), max_size=4)
    if depth >= 2:
        return lines
    inner = _block(depth + 1, noisy)
    conditions = st.builds(lambda a, op, b: f"{a} {op} {b}" if op not in ("exists", "missing") else f"{a} {op}",
                           values, st.sampled_from(["==", "!=", "<", ">=", "in", "exists", "missing"]), values)
    ending = st.sampled_from([[], [], ['FAIL "no"'], ["RETURN result1"]])
    parallel = inner if noisy else st.lists(_requests(values), max_size=3)
    blocks = [lines,
              st.builds(lambda c, a, b, e: [f"IF {c}", *a, "ELSE", *b, *e, "END"], conditions, inner, inner, ending),
              st.builds(lambda c, a: [f"IF {c}", *a, "END"], conditions, inner),
              st.builds(lambda a: ["PARALLEL", "TO sensor read", "GET", *a, "END"], parallel),
              st.builds(lambda a, b: a + b, inner, inner)]
    return st.one_of(*blocks)


def _flows(noisy: bool) -> st.SearchStrategy[str]:
    catch = st.one_of(st.just([]), st.builds(lambda b: ["ON ERROR", *b, "END"], _block(1, noisy)))
    answer = st.sampled_from([[], ["RETURN result1"], ["RETURN {\"a\": result1, \"p\": payload}"]])
    return st.builds(lambda a, r, c, b: "\n".join(["g1", "TO sensor read", "GET", *a, *r, *c, "", "g2",
                                                   "TO component1 1", "POST payload", *b]) + "\n",
                     _block(0, noisy), answer, catch, _block(0, noisy))


FLOW_TEXT = _flows(noisy=True)


@given(text=FLOW_TEXT)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_generated_flows_load_or_are_refused_with_file_line_and_column(text):
    class Component:
        def __init__(self, name: str, endpoints: dict[str, str]) -> None:
            self.name, self.endpoints = name, endpoints

    components = {"sensor": Component("sensor", {"read": "read", "fail": "fail"}),
                  "component1": Component("component1", {"1": "endpoint1"})}
    flows, errors = parse_flows(text)
    if not errors:
        _, errors = resolve_flows(flows, components, rules=FlowRules(
            publish_problem=lambda topic: None if topic.startswith("flows/") else "is outside flows/"))
    lines = text.count("\n")
    for error in errors:
        where = error.split(": ", 1)[0].split(":")
        assert where[0] == "flows.conf" and 1 <= int(where[1]) <= lines + 1 and int(where[2]) >= 1, error


@given(text=_flows(noisy=False), payload=st.sampled_from([None, 1, {"a": 2, "items": [3]}, {"a": "x"}]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
def test_generated_flows_that_load_run_to_one_result(tmp_path_factory, mock, broker, text, payload):
    extra = {k: {**v, "config": {**v["config"], "port": mock.port}} for k, v in EXTRA.items()}
    cfg = write_config(tmp_path_factory.mktemp("gen"), mock.port, broker_port=broker.port, flows=text,
                       components=extra)
    try:
        config = load_config(cfg)
    except ConfigError:
        config = None  # refused with a place: the test above
    assume(config is not None)  # (hypothesis says so when too few load)
    assert config is not None
    n = InProcessNode(config).start()
    try:
        for flow in ("g1", "g2"):
            res = n.run(FlowRequest(flow, payload), timeout=20)
            assert res["status"] in ("ok", "error")
            assert res["status"] == "ok" or res["error"]["code"] != "internal_error", res
    finally:
        n.kill()


# ----- config_files/examples ---------------------------------------------------------------------
def test_the_examples_run_as_their_comments_say(tmp_path, mock, broker):
    src = HERE.parent / "config_files" / "examples"
    cfg = tmp_path / "examples"
    cfg.mkdir()
    for f in src.glob("*.conf"):
        (cfg / f.name).write_bytes(f.read_bytes().replace(b"6000", str(mock.port).encode()))
    comm = json.loads((cfg / "comm.conf").read_text())
    comm["mqtt"].update(port=broker.port, client_id="examples-test")
    (cfg / "comm.conf").write_text(json.dumps(comm))
    got: list[tuple[str, dict]] = []
    ready = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="examples-sub")
    sub.on_connect = lambda c, *a: c.subscribe([("flows/#", 1), ("rm/dead-letters", 1)])
    sub.on_subscribe = lambda *a: ready.set()
    sub.on_message = lambda c, u, m: got.append((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    n = InProcessNode(load_config(cfg)).start()
    try:
        assert ready.wait(10)
        hot = run(n, "sensor-route", {"site": "north", "celsius": 41})
        assert hot["result"] == {"site": "north", "celsius": 41} and "results" not in hot
        assert calls(mock, "alarm") == 1 and calls(mock, "store") == 0
        cold = run(n, "sensor-route", {"site": "south", "celsius": 12})
        assert cold["result"]["celsius"] == 12 and calls(mock, "store") == 1
        assert run(n, "sensor-route", {"site": "x"})["error"]["message"].startswith("a reading needs celsius")

        overview = run(n, "device-overview", {"device": "d-7"})
        assert overview["status"] == "ok" and overview["result"]["device"]["id"] == "d-7"
        assert overview["result"]["readings"] == [] and overview["result"]["tickets"]["id"] == "d-7"

        mock.flaky_failures = 10
        failed = run(n, "flaky-upload", {"reading": 5})
        assert failed["error"]["code"] == "flow_failed" and calls(mock, "flaky") == 3
        assert run(n, "batch-of-two", {"first": {"celsius": 1}, "second": {"celsius": 2}})["result"] == {
            "first": 1, "second": 2}
        wait_for(lambda: len(got) >= 3, 10, "the alert, the operators' note and the dead letter")
        topics = {t: body for t, body in got}
        assert topics["flows/alerts/hot"] == {"site": "north", "celsius": 41}
        assert topics["flows/operators"]["payload"] == {"reading": 5} and "HTTP 503" in topics["flows/operators"]["why"]
        letters = [body for t, body in got if t == "rm/dead-letters"]
        assert {letter["request"]["id_flow"] for letter in letters} == {"sensor-route", "flaky-upload"}
    finally:
        n.kill()
        sub.loop_stop()
        sub.disconnect()


def test_check_explain_shows_blocks_options_and_where_values_come_from():
    flows, errors = parse_flows("""x
TO a 1
GET RETRY 2 TIMEOUT 1s
PARALLEL
  RUN y result1.id
  POST BODY {"v": payload.v} OPTIONAL
END
PUBLISH flows/x result2 QOS 1 RETAIN
RETURN result3
ON ERROR
  FAIL "broken"
END

y
TO a 1
POST payload
""")

    class Component:
        name, endpoints = "a", {"1": "e1"}

        @staticmethod
        def url(endpoint: str) -> str:
            return f"http://127.0.0.1:9/{endpoint}"

    resolved, errors = resolve_flows(flows, {"a": Component()})
    assert errors == []
    from runtime_manager.core.plans import explain

    text = "\n".join(explain(resolved["x"]))
    for part in ("1. GET a 1 (http://127.0.0.1:9/1)  -> result1  [retried up to 2 time(s), 100 ms apart, doubling; "
                 "1000 ms an attempt]",
                 "PARALLEL: at once", "2. RUN flow y with result1.id as its payload  -> result2",
                 "result1.id: id of the answer of request 1", "[optional: null when it fails]",
                 "PUBLISH result2 to flows/x (QoS 1, retained)", "RETURN result3: the flow's answer",
                 "ON ERROR: when a step fails", 'FAIL "broken": the flow ends with error flow_failed'):
        assert part in text, text


def test_a_forwarded_flows_answer_comes_back_as_its_answer():
    from runtime_manager.core.result import Placement, peer_result

    req = FlowRequest("x", 1)
    got = peer_result(req, {"status": "ok", "result": {"v": 2}, "node": "2"}, "2", Placement("lb", "node 2"))
    assert got.to_dict()["result"] == {"v": 2} and "results" not in got.to_dict()
    plain = peer_result(req, {"status": "ok", "results": [1], "node": "2"}, "2", Placement("lb", "node 2"))
    assert plain.to_dict()["results"] == [1] and "result" not in plain.to_dict()
