"""The flows language: parsing, load-time checks, and error messages with positions."""

from __future__ import annotations

import pytest
from conftest import ORIGINAL

from runtime_manager.config import HttpComponent
from runtime_manager.core.flows import Get, Post, Target, parse_flows, resolve_flows
from runtime_manager.core.values import Payload, ResultRef


def comp(name: str, endpoints=("1", "2")) -> HttpComponent:
    return HttpComponent(name, 1, "http", "127.0.0.1", 1, {e: f"ep{e}" for e in endpoints})


COMPONENTS = {n: comp(n) for n in ("component1", "component2", "component3", "GET")}


def parse_ok(text: str) -> dict:
    flows, errors = parse_flows(text)
    assert errors == []
    resolved, errors = resolve_flows(flows, COMPONENTS)
    assert errors == []
    return resolved


def errors_of(text: str) -> list[str]:
    flows, errors = parse_flows(text)
    if errors:
        return errors
    return resolve_flows(flows, COMPONENTS)[1]


def test_original_flows_file():
    flows = parse_ok((ORIGINAL / "flows.conf").read_text())
    assert list(flows) == ["1", "2", "3"]
    f1 = flows["1"]
    assert f1.steps[0] == Target("component1", "1", 2, 1, 15)
    assert [c.number for c in f1.calls] == [1, 2, 3]
    assert f1.calls[2].step.args == (ResultRef(1), ResultRef(2))
    assert flows["2"].calls[1].step.args == (ResultRef(1), Payload())
    assert isinstance(flows["3"].calls[0].step, Get)


def test_multi_digit_ids_and_result10():
    steps = "\n".join(["TO component1 1", "GET"] * 11)
    text = f"1\nTO component1 1\nGET\n\n12\n{steps}\nTO component2 2\nPOST result10 result11 payload\n\n123\nTO component3 1\nGET\n"
    flows = parse_ok(text)
    assert list(flows) == ["1", "12", "123"]
    assert flows["12"].calls[-1].step.args == (ResultRef(10), ResultRef(11), Payload())
    assert flows["12"].calls[-1].number == 12
    assert flows["1"].calls[0].component.name == "component1"
    assert flows["123"].calls[0].component.name == "component3"


def test_crlf_tabs_spaces_comments_and_trailing_blank_lines():
    text = (
        "# a file comment\r\n\r\n"
        "flow-a   # trailing comment\r\n"
        "\tTO  component1\t1\r\n"
        "# a whole-line comment does not end the flow\r\n"
        "   POST   payload  \r\n"
        "TO component2 1\r\n"
        "POST result1\r\n\r\n\r\n\r\n"
    )
    flows = parse_ok(text)
    assert list(flows) == ["flow-a"]
    assert len(flows["flow-a"].calls) == 2


def test_no_final_newline_and_blank_lines_with_spaces():
    flows = parse_ok("1\nTO component1 1\nGET\n   \n\t\n2\nTO component1 2\nPOST payload")
    assert list(flows) == ["1", "2"]


def test_keyword_as_component_name():
    flows = parse_ok("1\nTO GET 2\nGET\n")
    assert flows["1"].calls[0].component.name == "GET"


def test_empty_file_has_no_flows():
    assert parse_ok("") == {}
    assert parse_ok("# only a comment\n\n") == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1\nTO component1 1\nPOTS payload\n", "flows.conf:3:1: unknown instruction 'POTS' (expected TO, GET, POST, IF, PARALLEL, RUN, PUBLISH, RETURN, FAIL or ON ERROR)"),
        ("1\nTO component1 1\nPOSTT payload\n", "flows.conf:3:1: unknown instruction 'POSTT' (expected TO, GET, POST, IF, PARALLEL, RUN, PUBLISH, RETURN, FAIL or ON ERROR)"),
        ("1\nTO component1\nGET\n", "flows.conf:2:14: unexpected end of line (expected a component name and an endpoint id after TO)"),
        ("1\nTO component1 1 9\nGET\n", "flows.conf:2:17: unexpected '9' (expected end of line)"),
        ("1\nTO component1 1\nPOST\n", "flows.conf:3:5: unexpected end of line (expected payload, resultN, a field path or a JSON value after POST)"),
        ("1\nTO component1 1\nPOST foo\n", "flows.conf:3:6: unknown argument 'foo' (expected payload, resultN, a field path such as payload.id or result1.items[0], or a JSON value)"),
        ("\nTO component1 1\nGET\n", "flows.conf:2:1: unexpected 'TO' (expected a flow id: digits or a name, then its steps)"),
        ("1\nTO component9 1\nGET\n", "flows.conf:2:4: unknown component 'component9' in flow '1' (known: GET, component1, component2, component3)"),
        ("1\nTO component1 7\nGET\n", "flows.conf:2:15: component 'component1' has no endpoint '7' (known: 1, 2)"),
        ("1\nGET\n", "flows.conf:2:1: GET before any TO in flow '1'"),
        ("1\nPOST payload\n", "flows.conf:2:1: POST before any TO in flow '1'"),
        ("1\nTO component1 1\nPOST result1\n", "flows.conf:3:1: result1 refers to a request that has not happened yet (this is request 1 of flow '1')"),
        ('1\nTO component1 1\nPOST {"a" 1}\n', "flows.conf:3:11: unexpected '1}' (expected ':')"),
        ('1\nTO component1 1\nPOST [1, 2\n', "flows.conf:3:11: unexpected end of line (expected ',' or ']')"),
        ('1\nTO component1 1\nPOST {"a": 1, "a": 2}\n', 'flows.conf:3:15: key "a" is given twice in this object'),
        ('1\nTO component1 1\nPOST "\\q"\n', 'flows.conf:3:6: not a JSON value: "\\q" (Invalid \\escape)'),
        ("1\nTO component1 1\nPOST BODY {\"t\": result1.temp}\n",
         "flows.conf:3:1: result1 refers to a request that has not happened yet (this is request 1 of flow '1')"),
        ("1\nTO component1 1\nGET\nPOST result0\n", "flows.conf:4:1: result0 refers to a request that has not happened yet (this is request 2 of flow '1')"),
        ("1\nTO component1 1\n", "flows.conf:1:1: flow '1' has no GET or POST"),
        ("1\nTO component1 1\nGET\n\n1\nTO component1 1\nGET\n", "flows.conf:5:1: duplicate flow id '1' (first defined on line 1)"),
    ],
)
def test_errors_name_line_column_and_what_was_expected(text, expected):
    assert expected in errors_of(text)


def test_every_broken_flow_is_reported_in_one_run():
    text = "1\nTO component1 1\nPOTS x\n\n2\nTO component1\n\n3\nTO component1 1\nGET\n"
    errors = errors_of(text)
    assert [e.split(": ")[0] for e in errors] == ["flows.conf:3:1", "flows.conf:6:14"]


def test_a_new_flow_without_blank_line_is_explained():
    errors = errors_of("1\nTO component1 1\nGET\n2\nTO component1 1\nGET\n")
    assert errors == ["flows.conf:4:1: unknown instruction '2' (expected TO, GET, POST, IF, PARALLEL, RUN, PUBLISH, RETURN, FAIL or ON ERROR) (a new flow needs a blank line before its id)"]


def test_post_dataclass_shape():
    flows, _ = parse_flows("x\nTO a 1\nPOST payload result3\n")
    assert flows[0].steps[1] == Post((Payload(), ResultRef(3)), 3, 1)


def test_check_explains_a_flows_plan(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, write_config

    flows = ("shaped\nTO component1 1\nGET\nTO component1 1\nPOST BODY {\"temp\": result1.payload[0], "
             "\"site\": payload.site}\nTO component1 1\nPOST payload.items[0].id {\"k\": 1} result2\n")
    cfg = write_config(tmp_path / "cfg", 6123, flows=flows)  # check calls no component
    done = subprocess.run([sys.executable, "-m", "runtime_manager", "check", "--config-dir", str(cfg), "--explain",
                           "shaped"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    plan = done.stdout.split("flow shaped", 1)[1].splitlines()
    url = "http://127.0.0.1:6123/endpoint1"
    assert plan == [
        " (line 1): 3 request(s)",
        f"  1. GET component1 1 ({url})  -> result1",
        f"  2. POST component1 1 ({url})  -> result2",
        '     body: {"temp": result1.payload[0], "site": payload.site}',
        "     result1.payload[0]: payload[0] of the answer of request 1",
        "     payload.site: site of the request's payload",
        f"  3. POST component1 1 ({url})  -> result3",
        '     body: {"payload": [payload.items[0].id, {"k": 1}, result2]}',
        "     payload.items[0].id: items[0].id of the request's payload",
        "     result2: the answer of request 2",
    ]
    missing = subprocess.run([sys.executable, "-m", "runtime_manager", "check", "--config-dir", str(cfg), "--explain",
                              "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no flow 'nope'" in missing.stderr
