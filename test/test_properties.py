"""Property-based tests (hypothesis) of every input surface: MQTT requests, REST
bodies, orchestrator control messages and config files. Whatever comes in: one
documented answer (or error list), and the node goes on serving."""

from __future__ import annotations

import json
import signal
import string
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ORIGINAL, ROOT, RmProcess, write_config
from helpers import MqttProbe, free_port, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mock_services import MockServices

from runtime_manager.config import load_config
from runtime_manager.core.errors import HTTP_STATUS, BadRequest, ConfigError
from runtime_manager.core.request import MAX_DEPTH, deeper_than, parse_request
from runtime_manager.core.result import error_result
from runtime_manager.core.topics import topic_name_problem
from runtime_manager.orchestrator.control import ControlError, parse_channels, parse_create

FLOWS = "1\nTO component1 1\nPOST payload\n\necho\nTO component1 2\nGET\n"
CODES = set(HTTP_STATUS)

# Odd text: control characters, non-characters, surrogates' neighbours, wildcards, '$'.
odd_text = st.text(st.one_of(st.characters(), st.sampled_from("\x00\x01\x1f\x7f\x9f\ufffe\uffff\ufdd0#+$/")), max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), odd_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(odd_text, inner, max_size=4)), max_leaves=20)


# near the 65,535-byte limit of a topic, in 1-, 2- and 3-byte characters
long_topics = st.builds(lambda ch, n: ch * (n // len(ch.encode())), st.sampled_from(["t", "é", "€"]), st.integers(65530, 65540))


@st.composite
def deep_values(draw: Any) -> Any:
    value: Any = draw(scalars)
    for _ in range(draw(st.integers(0, 300))):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


requests_ = st.fixed_dictionaries(
    {"id_flow": st.one_of(st.sampled_from(["1", "echo", "7"]), st.integers(-5, 20), scalars)},
    optional={"payload": st.one_of(json_values, deep_values()), "request_id": st.one_of(odd_text, st.integers(), scalars),
              "reply_to": st.one_of(odd_text, long_topics, scalars),
              "is_load_balancing": scalars},
)
bodies = st.one_of(requests_.map(json.dumps), st.binary(max_size=200), json_values.map(json.dumps), odd_text)


# ----- pure: a request is either a checked FlowRequest or a BadRequest ------------------------
@given(bodies)
@settings(max_examples=400, deadline=None)
def test_a_message_is_a_checked_request_or_a_bad_request(body: Any) -> None:
    try:
        req = parse_request(body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body,
                            max_bytes=4 * 1024 * 1024)
    except BadRequest as exc:
        result = error_result(None, "n", exc)
        assert result.code == "bad_request" and result.to_json()
        return
    assert not deeper_than(req.payload, MAX_DEPTH)
    assert req.reply_to is None or topic_name_problem(req.reply_to) is None
    assert error_result(req, "n", BadRequest("x")).to_json()  # its answer can always be serialised


@given(odd_text)
def test_topic_names_the_node_accepts_are_valid_mqtt(topic: str) -> None:
    if topic_name_problem(topic) is None:
        assert topic and "\x00" not in topic and "#" not in topic and "+" not in topic and not topic.startswith("$")
        assert all(ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F for c in topic)


# ----- pure: a control create is a ModuleSpec or a ControlError ---------------------------------
control_args = st.one_of(json_values, json_values.map(json.dumps), odd_text, st.fixed_dictionaries({}, optional={
    "argv": st.one_of(json_values, odd_text), "env": st.one_of(json_values, odd_text), "dirs": json_values,
    "repeat": st.one_of(st.integers(), scalars), "limit": st.one_of(st.floats(), st.integers(), scalars),
    "fault_crash": scalars, "engine": scalars}))


@given(st.fixed_dictionaries({"uuid": st.one_of(odd_text, scalars)},
                             optional={"file": st.one_of(st.sampled_from(["args.wat", "../x", "args.wat\x00"]), odd_text,
                                                         scalars),
                                       "args": control_args, "channels": json_values, "name": scalars}))
@settings(max_examples=400, deadline=None)
def test_a_create_is_a_module_spec_or_a_control_error(data: dict) -> None:
    try:
        spec = parse_create(data, (ROOT / "runtimes").resolve())
    except ControlError as exc:
        assert str(exc)
        return
    assert spec.path.is_relative_to((ROOT / "runtimes").resolve()) and spec.repeat >= 1
    assert spec.limit_s is None or 0 < spec.limit_s <= 30 * 86400


channel_entry = st.fixed_dictionaries({}, optional={
    "path": st.one_of(st.sampled_from(["in", "/ch/light", "a\x00"]), odd_text, scalars),
    "mode": st.one_of(st.sampled_from(["r", "w", "rw", "wr"]), scalars),
    "type": st.one_of(st.just("pubsub"), scalars),
    "topic": st.one_of(st.sampled_from(["realm/in", "realm/+/x", "realm/proc/control", "other/x", ""]), odd_text, scalars),
    "params": st.one_of(json_values, st.fixed_dictionaries({"topic": st.one_of(odd_text, st.just("realm/p"))}))})


@given(st.one_of(json_values, odd_text, st.lists(st.one_of(channel_entry, json_values), max_size=5),
                 st.lists(channel_entry, max_size=5).map(repr)),
       st.sampled_from([None, "", "realm/a/"]))
@settings(max_examples=400, deadline=None)
def test_channels_are_checked_channels_or_a_control_error(value: Any, prefix: str | None) -> None:
    try:
        channels = parse_channels(value, "realm", prefix)
    except ControlError as exc:
        assert str(exc)
        return
    assert len({c.path for c in channels}) == len(channels)
    for c in channels:
        assert c.mode in ("r", "w", "rw") and c.path and topic_name_problem(c.topic) is None
        assert "+" not in c.topic and "#" not in c.topic and not c.topic.startswith(("realm/proc/", "realm/rm/"))
        assert c.topic.startswith("realm/" if prefix is None else prefix)


# ----- pure: config files load or list their errors as FILE: lines ---------------------------------
CONFIG_FILES = ["comm.conf", "components.conf", "nodes.conf", "load_balancer.conf", "runtime.conf"]


@given(st.sampled_from([*CONFIG_FILES, "flows.conf"]),
       st.one_of(json_values.map(json.dumps), st.binary(max_size=100).map(lambda b: b.decode("latin-1")), odd_text,
                 st.text(st.sampled_from(string.printable + "\t"), max_size=200)))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_config_file_content_loads_or_is_listed_as_errors(name: str, content: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg"
        cfg.mkdir()
        for f in ORIGINAL.glob("*.conf"):
            (cfg / f.name).write_bytes(f.read_bytes())
        (cfg / name).write_text(content, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(cfg)
        except ConfigError as exc:
            assert exc.errors and all(e.split(":", 1)[0] in {*CONFIG_FILES, "flows.conf"} for e in exc.errors), exc.errors
        except UnicodeEncodeError:
            pass  # the text could not even be written


# ----- live: a node answers every request exactly once and keeps serving -------------------------
@pytest.fixture(scope="module")
def live(broker, tmp_path_factory: pytest.TempPathFactory):
    mock = MockServices().start()
    tmp = tmp_path_factory.mktemp("props")
    port = free_port()
    cfg = write_config(tmp / "cfg", mock.port, broker.port, rest_port=port, topic="prop", flows=FLOWS)
    served = RmProcess("serve", cfg).start("running:")
    wait_for(lambda: "subscribing" in served.log(), 20, "subscription")
    probe = MqttProbe(broker.port, ("prop/result", "prop/reply/#"))
    yield served, f"http://127.0.0.1:{port}", probe
    probe.close()
    served.stop(signal.SIGKILL)
    mock.stop()


@given(requests_)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_mqtt_request_gets_one_documented_answer(live, body: dict) -> None:
    served, _, probe = live
    rid = uuid.uuid4().hex
    if isinstance(body.get("reply_to"), str) and topic_name_problem(body["reply_to"]) is None:
        body["reply_to"] = f"prop/reply/{rid}"  # a valid one, where the probe listens
    probe.publish({**body, "request_id": rid}, "prop")
    res = probe.wait_result(rid, 15)
    assert res["status"] in ("ok", "error") and (res["status"] == "ok" or res["error"]["code"] in CODES)
    good = uuid.uuid4().hex
    probe.publish({"id_flow": "echo", "request_id": good}, "prop")
    assert probe.wait_result(good, 15)["status"] == "ok" and served.alive
    assert len(probe.results[rid]) == 1  # exactly one answer


@given(bodies)
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_rest_body_gets_a_documented_json_answer(live, body: Any) -> None:
    served, base, _ = live
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    r = requests.post(f"{base}/startrm", data=data, headers={"Content-Type": "application/json"}, timeout=20)
    assert r.status_code in {200, *HTTP_STATUS.values(), 413}
    answer = r.json()
    assert answer["status"] in ("ok", "error")
    if answer["status"] == "error":
        assert answer["error"]["code"] in CODES and r.status_code == HTTP_STATUS[answer["error"]["code"]]
    assert requests.get(f"{base}/health", timeout=5).status_code == 200 and served.alive


# ----- live: every control message to a runtime gets one reply, and modules still run ------------
from test_orchestrator import moddir, node, orch, realm  # noqa: E402, F401  (fixtures)


@given(st.fixed_dictionaries({"uuid": st.one_of(st.uuids().map(str), odd_text, scalars)},
                             optional={"file": st.one_of(st.sampled_from(["args.wat", "../x", "args.wat\x00", "nope.wat"]),
                                                         odd_text, scalars),
                                       "args": control_args, "channels": json_values, "name": scalars}),
       st.sampled_from(["create", "delete", "dance", None]))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_control_message_gets_one_reply_and_the_runtime_keeps_serving(node, orch, data, action):  # noqa: F811
    """One reply each (the Silverline dialect answers creates, and errors of other
    actions; a delete is logged, not answered), and modules still run afterwards."""
    oid = str(uuid.uuid4())
    body = {"object_id": oid, "action": action, "type": "req", "data": {"type": "module", **data}}
    orch.client.publish(f"{orch.realm}/proc/control/{node.runtime}", json.dumps(body), qos=1).wait_for_publish(5)
    if action != "delete":
        reply = orch.reply_to(oid, 10)
        assert reply["result"] in ("ok", "error")
        if reply["result"] == "ok" and action == "create":  # it runs: stop it, so slots stay free
            orch.control(node.runtime, "delete", {"type": "module", "uuid": data["uuid"]})
            orch.exited(data["uuid"], 10)
    good = orch.create(node.runtime, "args.wat", [], name="good")  # handled after the message above
    assert orch.exited(good)["code"] == 0 and node.alive
    replies = [b for _, b in orch.json_messages("/proc/control/") if b.get("object_id") == oid
               and str(b.get("type")).endswith("resp")]
    assert len(replies) == (0 if action == "delete" else 1)


# ----- statuses heard on rm/nodes/+: anything a publisher sends ------------------------------------------
status_values = st.one_of(scalars, st.floats(), st.integers(min_value=-10**30, max_value=10**30), json_values)
statuses = st.fixed_dictionaries(
    {"node": st.one_of(st.sampled_from(["1", "2", "3", "9"]), scalars)},
    optional={k: status_values for k in ("state", "in_flight", "queued", "capacity", "interval_ms", "rest", "mqtt_topic",
                                         "reason", "flows", "load")}
    | {"rest": st.one_of(status_values, st.fixed_dictionaries({}, optional={"ip": status_values, "port": status_values,
                                                                             "endpoint": status_values,
                                                                             "protocol": status_values}))},
)


@given(st.lists(st.tuples(statuses, st.floats(0, 100)), max_size=8), st.booleans())
@settings(max_examples=400, deadline=None)
def test_any_status_keeps_the_peer_table_usable(heard: list, discover: bool) -> None:
    """Whatever arrives on the status topic, the table never raises, loads are
    finite numbers, and placement can read it."""
    from runtime_manager.cluster.peers import PeerTable
    from runtime_manager.config import PeerAddress

    nodes = {i: PeerAddress(i, "http", "127.0.0.1", 5000, "startrm") for i in ("1", "2", "3")}
    table = PeerTable("1", nodes, 1.0, discover)
    now = 0.0
    for status, dt in heard:
        now += dt
        table.heard(status, now)
        table.tick(now)
        for peer in table.healthy():
            assert 0 <= peer.load < float("inf")
            assert peer.address is not None and peer.address.url.startswith("http")
            assert peer.mqtt_topic is None or not topic_name_problem(peer.mqtt_topic)
        json.dumps(table.to_dict(now))


def test_a_message_orjson_refuses_keeps_its_request_id_for_the_answer() -> None:
    """Found by hypothesis: json.dumps writes a lone surrogate as "\\udc2d", which
    orjson refuses; the bad_request answer must still carry the request id."""
    for body, rid in ((json.dumps({"id_flow": "1", "reply_to": "\udc2d", "request_id": "r-1"}), "r-1"),
                      (json.dumps({"id_flow": "1", "request_id": "\udc2d"}), "")):
        with pytest.raises(BadRequest) as info:
            parse_request(body.encode())
        assert info.value.request_id == rid  # type: ignore[attr-defined]


@given(json_values, st.integers(0, 6))
@settings(max_examples=400, deadline=None)
def test_counting_brackets_never_lets_a_deep_value_through(value: Any, limit: int) -> None:
    """The cheap check (brackets in the text) only skips the walk when the value cannot be too deep."""
    from runtime_manager.core.request import may_nest_deeper

    raw = json.dumps(value)
    if not may_nest_deeper(raw, limit):
        assert not deeper_than(value, limit)
    if not may_nest_deeper(raw.encode(), limit):
        assert not deeper_than(value, limit)


@given(json_values)
@settings(max_examples=400, deadline=None)
def test_a_checked_status_keeps_known_keys_of_the_right_types_only(raw: Any) -> None:
    """Whatever a status holds, what is kept is a flat record of known keys:
    nothing deep, nothing unknown, nothing that breaks /status."""
    from runtime_manager.cluster.peers import checked_status

    for candidate in (raw, {"node": "2", "state": "online", **(raw if isinstance(raw, dict) else {"x": raw})}):
        status = checked_status(candidate)
        if status is None:
            continue
        assert set(status) <= {"node", "state", "in_flight", "queued", "capacity", "queue_depth", "processes",
                               "interval_ms", "pid", "time", "load", "uptime_s", "cpu_percent", "rss_mb", "reason",
                               "version", "config_dir", "ready", "flows", "rest", "mqtt_topic", "instance"}
        assert not deeper_than(status, 3)
        json.dumps(status)


# ----- checkpoints and module bytes: anything read is a value or a named error -------------------------
from runtime_manager.wasm.checkpoint import PAGE, Checkpoint, CheckpointError, decode, encode  # noqa: E402
from runtime_manager.wasm.migratable import export_mutable_globals, read_sections  # noqa: E402

memories = st.lists(st.sampled_from([bytes(PAGE), b"\x01" * PAGE, bytes(range(256)) * (PAGE // 256)]), max_size=6) \
    .map(b"".join)


@given(memories, st.dictionaries(st.text(max_size=12), st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(
    allow_nan=False)), max_size=4), st.integers(0, 2**20), st.booleans())
@settings(max_examples=60, deadline=None)
def test_a_checkpoint_reads_back_as_it_was_written(memory: bytes, values: dict, stdout: int, compress: bool) -> None:
    ck = Checkpoint("ab" * 32, memory, values, buffer=0, buffer_size=len(memory), safe_point="fd_write",
                    stdout_bytes=stdout)
    back = decode(encode(ck, compress), len(memory))
    assert bytes(back.memory) == memory and back.globals == values and back.stdout_bytes == stdout


@given(memories.filter(bool), st.data())
@settings(max_examples=150, deadline=None)
def test_a_damaged_or_foreign_checkpoint_is_a_checkpoint_error(memory: bytes, data: st.DataObject) -> None:
    blob = bytearray(encode(Checkpoint("ab" * 32, memory, {}, 0, PAGE, "poll_oneoff")))
    for _ in range(data.draw(st.integers(1, 4))):
        what = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if what == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
        elif what == "cut":
            del blob[data.draw(st.integers(0, len(blob))):]
        elif what == "grow":
            blob += data.draw(st.binary(max_size=64))
    try:
        ck = decode(bytes(blob), 4 * len(memory))
    except CheckpointError:
        return
    assert len(ck.memory) <= 4 * len(memory) and isinstance(ck.globals, dict)


@given(st.binary(max_size=300).map(lambda b: b"\0asm\x01\0\0\0" + b) | st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_any_module_bytes_are_read_or_refused_with_a_reason(data: bytes) -> None:
    try:
        read_sections(data)
        out = export_mutable_globals(data)
    except ValueError:
        return
    assert out.startswith(b"\0asm")


@given(memories, memories, st.booleans())
@settings(max_examples=60, deadline=None)
def test_a_delta_against_a_base_reads_back_as_the_whole_memory(base: bytes, memory: bytes, in_place: bool) -> None:
    import hashlib

    digest = hashlib.sha256(base).hexdigest()
    ck = Checkpoint("ab" * 32, memory, {}, buffer=0, buffer_size=len(memory), safe_point="fd_write", base_sha256=digest)
    blob = encode(ck, base=base)
    back = decode(blob, max(1, len(memory)), bytearray(base) if in_place else base, digest)
    assert bytes(back.memory) == memory
    with pytest.raises(CheckpointError):  # without its base, or with another
        decode(blob, max(1, len(memory)), None, None)
