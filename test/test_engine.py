"""The flow engine in isolation: real fake services over HTTP, no MQTT, no REST."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import write_config
from helpers import InProcessNode, free_port, wait_for
from mock_services import MockServices

from runtime_manager.config import load_config
from runtime_manager.core.request import FlowRequest

EXTRA = {
    "broken": {"id": 7, "config": {"protocol": "http", "ip": "127.0.0.1", "port": 0, "endpoints": {"fail": "fail", "hang": "hang",
                                                                                                    "text": "text"}}},
    "down": {"id": 8, "config": {"protocol": "http", "ip": "127.0.0.1", "port": 0, "endpoints": {"1": "endpoint1"}, "retries": 1}},
}
FLOWS = """1
TO component1 1
POST payload
TO component2 1
POST result1
TO component3 1
POST result1 result2

fail
TO component1 2
GET
TO broken fail
GET

hang
TO broken hang
POST payload

text
TO broken text
GET
TO component1 1
POST result1

down
TO down 1
POST payload
"""


@pytest.fixture
def make_engine(tmp_path: Path, mock: MockServices):
    engines: list[InProcessNode] = []

    def make(**kw) -> InProcessNode:
        extra = {k: {**v, "config": {**v["config"], "port": mock.port}} for k, v in EXTRA.items()}
        extra["down"]["config"]["port"] = free_port()  # nothing listens there
        extra["broken"]["config"]["timeout_s"] = kw.pop("timeout_s", 0.5)
        cfg = write_config(tmp_path / f"cfg{len(engines)}", mock.port, flows=FLOWS, components=extra, **kw)
        engine = InProcessNode(load_config(cfg)).start()
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.kill()


def run(engine: InProcessNode, flow: str, payload=None, **kw) -> dict:
    return engine.run(FlowRequest(flow, payload, **kw), timeout=20)


def test_post_bodies_are_real_json_and_results_chain(make_engine, mock):
    engine = make_engine()
    res = run(engine, "1", {"a": "b"})
    assert res["status"] == "ok" and res["node"] and res["elapsed_ms"] > 0
    posted = [body for path, body in mock.bodies if path == "endpoint1"]
    assert posted[0] == {"payload": [{"a": "b"}]}  # parsed as JSON by the service, not a Python repr
    assert posted[2] == {"payload": [res["results"][0], res["results"][1]]}


def test_multi_digit_flow_ids_run_their_own_flow(tmp_path, mock):
    """The original matched ids on their first character: flow 12 ran flow 1."""
    steps = "\n".join(["TO component1 2", "GET"] * 9)
    flows = f"1\nTO component1 1\nPOST payload\n\n12\n{steps}\nTO component2 1\nPOST result9\nTO component3 1\nPOST result10 payload\n"
    cfg = write_config(tmp_path / "c12", mock.port, flows=flows)
    engine = InProcessNode(load_config(cfg)).start()
    try:
        res = run(engine, "12", "p")
        assert res["status"] == "ok" and len(res["results"]) == 11
        assert res["results"][9]["payload"] == [res["results"][8]]
        assert res["results"][10]["payload"] == [res["results"][9], "p"]
        assert len(run(engine, "1", "p")["results"]) == 1
    finally:
        engine.kill()


def test_component_answering_500_fails_the_flow_naming_the_step(make_engine):
    res = run(make_engine(), "fail")
    assert res["status"] == "error"
    err = res["error"]
    assert err["code"] == "component_error" and err["step"] == 2
    assert err["component"] == "broken" and err["endpoint"] == "fail"
    assert "HTTP 500" in err["message"] and "component exploded" in err["message"]
    assert "results" not in res  # no error text is passed on as a result


def test_component_that_hangs_times_out(make_engine):
    res = run(make_engine(timeout_s=0.3), "hang", "x")
    assert res["error"]["code"] == "timeout" and res["error"]["step"] == 1
    assert "no answer within 0.3 s" in res["error"]["message"]


def test_component_that_is_down_is_retried_then_fails(make_engine, caplog):
    res = run(make_engine(), "down", "x")
    assert res["error"]["code"] == "component_error"
    assert "cannot reach" in res["error"]["message"] and res["error"]["component"] == "down"
    assert "retry 1 of 1" in caplog.text


def test_text_answers_are_kept_as_text(make_engine, mock):
    res = run(make_engine(), "text")
    assert res["results"][0] == "plain text answer"
    assert res["results"][1]["payload"] == ["plain text answer"]


def test_task_timeout_bounds_a_whole_flow(make_engine):
    res = run(make_engine(timeout_s=30, runtime={"task_timeout_ms": 300}), "hang", "x")
    assert res["error"]["code"] == "timeout" and "task_timeout_ms" in res["error"]["message"]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (None, "load balancer said null"),
        ("http500", "load balancer answered HTTP 500"),
        ("garbage", "load balancer answered non-JSON"),
        ("noid", "load balancer answer lacks id_node"),
        (7, "node 7 unknown (not in nodes.conf)"),
        ("1", "load balancer said 1"),  # this node's own id
    ],
)
def test_load_balancer_answers_that_run_at_home(make_engine, mock, answer, reason):
    mock.lb_answer = answer
    engine = make_engine(runtime={"node_id": "1"})
    res = run(engine, "1", "p")
    assert res["status"] == "ok" and res["node"] == "1"
    assert res["placement"]["chosen"] == "home"
    assert res["placement"]["reason"].startswith(reason)
    assert mock.calls["endpoint1"] == 3


def test_load_balancer_not_running(make_engine, mock):
    engine = make_engine(lb={"protocol": "http", "ip": "127.0.0.1", "port": free_port(), "endpoint": "LB/id_node"})
    res = run(engine, "1", "p")
    assert res["status"] == "ok"
    assert res["placement"]["reason"].startswith("load balancer unreachable")


def test_forward_to_a_peer(make_engine, mock):
    mock.lb_answer = 2
    res = run(make_engine(), "1", "p")
    assert res["status"] == "ok" and res["node"] == "2"
    assert res["placement"] == {"asked": "lb", "chosen": "node 2", "reason": "load balancer said 2"}
    body = next(b for p, b in mock.bodies if p == "nodo2")
    assert body["is_load_balancing"] is True and body["id_flow"] == "1" and body["payload"] == "p"
    assert mock.calls["endpoint1"] == 0


def test_peer_that_is_down_falls_back_home(make_engine, mock):
    mock.lb_answer = 3
    nodes = {"3": {"id": 3, "config": {"protocol": "http", "ip": "127.0.0.1", "port": free_port(), "endpoint": "nodo3"}}}
    res = run(make_engine(nodes=nodes), "1", "p")
    assert res["status"] == "ok" and res["placement"]["chosen"] == "home"
    assert "node 3 is down" in res["placement"]["reason"]
    assert mock.calls["endpoint1"] == 3


def test_peer_answering_a_non_flow_error_falls_back_home(make_engine, mock):
    mock.lb_answer = 3
    nodes = {"3": {"id": 3, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port, "endpoint": "fail"}}}
    res = run(make_engine(nodes=nodes), "1", "p")
    assert res["status"] == "ok" and "node 3 answered HTTP 500 with non-JSON" in res["placement"]["reason"]


def test_a_peer_that_hangs_gets_the_request_s_time_less_a_margin_then_it_runs_at_home(make_engine, mock):
    """The peer's own timeout_s (30 s) does not hold the request: the forward
    gets what is left of task_timeout_ms less a margin, the peer is marked
    failed, and the request runs at home within its time."""
    mock.lb_answer = 3
    nodes = {"3": {"id": 3, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port, "endpoint": "hang"}}}
    started = time.monotonic()
    res = run(make_engine(nodes=nodes, runtime={"task_timeout_ms": 600}), "1", "p")
    assert time.monotonic() - started < 0.6 + 0.3
    assert res["status"] == "ok" and res["placement"]["chosen"] == "home", res
    assert "node 3" in res["placement"]["tried"][0] and "no answer within" in res["placement"]["tried"][0]


def test_forwarded_request_is_never_forwarded_again(make_engine, mock):
    mock.lb_answer = 2
    res = run(make_engine(), "1", "p", is_load_balancing=True)
    assert res["status"] == "ok" and mock.calls["LB/id_node"] == 0 and mock.calls["nodo2"] == 0
    assert res["placement"] == {"asked": "none", "chosen": "home", "reason": "placed by a peer"}


def test_full_queue_answers_overloaded(make_engine, mock):
    engine = make_engine(runtime={"workers": 1, "queue_depth": 2}, timeout_s=1.5)
    mock.slow_ms = 500
    results: list[dict] = []
    done = threading.Semaphore(0)

    def collect(r: dict) -> None:
        results.append(r)
        done.release()

    engine.submit(FlowRequest("hang", "x"), collect)  # occupies the one worker (no answer within 1.5 s)
    wait_for(lambda: engine.active == 1, 5, "the worker to be busy")
    for _ in range(5):
        engine.submit(FlowRequest("hang", "x"), collect)
    for _ in range(6):
        assert done.acquire(timeout=15)
    codes = sorted(r["error"]["code"] for r in results)
    assert codes.count("overloaded") == 3  # 1 running + 2 queued, 3 refused at once
    assert codes.count("timeout") == 3


def test_graceful_stop_finishes_accepted_requests(make_engine, mock):
    engine = make_engine()
    mock.delay_ms = 300
    results: list[dict] = []
    for _ in range(10):
        engine.submit(FlowRequest("1", "x"), results.append)
    assert engine.stop(timeout=10) is True
    assert len(results) == 10 and all(r["status"] == "ok" for r in results)
    assert not engine.accepting


def test_a_wedged_event_loop_is_seen_by_readiness_and_logged(make_engine, caplog):
    """A step that blocks the loop (or a stopped process, seen from outside):
    /readyz, served by other threads, says the loop has not run; once it runs
    again the node is ready and the lag is logged."""
    import logging

    from runtime_manager.observe.status import WEDGED_S, readiness

    node = make_engine(runtime={"node_id": "1"})
    assert readiness(node.node)["ready"]
    with caplog.at_level(logging.WARNING, logger="node"):
        node.loop.call_soon_threadsafe(time.sleep, WEDGED_S + 1.0)
        time.sleep(WEDGED_S + 0.6)
        wedged = readiness(node.node)
        assert not wedged["ready"] and any("has not run for" in r for r in wedged["reasons"]), wedged
        wait_for(lambda: readiness(node.node)["ready"], 5, "ready again")
        wait_for(lambda: "the event loop was held for" in caplog.text, 5, "the lag logged")


VALUE_FLOWS = """\
values
TO component1 1
POST payload.reading.temp {"unit": "C", "limits": [-10, 40.5]} 3 "text" null
TO component1 1
POST BODY {"temp": result1.payload[0], "site": payload.site, "all": [result1.endpoint, true, payload]}

deeper
TO component1 1
POST payload
TO component1 1
POST result1.nothing.here
"""


def test_field_paths_json_values_and_shaped_bodies(tmp_path, mock):
    cfg = write_config(tmp_path / "cfg", mock.port, flows=VALUE_FLOWS)
    engine = InProcessNode(load_config(cfg)).start()
    try:
        mock.bodies.clear()
        res = run(engine, "values", {"reading": {"temp": 21.5}, "site": "kitchen"})
        assert res["status"] == "ok", res
        bodies = [body for path, body in mock.bodies if path == "endpoint1"]
        assert bodies[0] == {"payload": [21.5, {"unit": "C", "limits": [-10, 40.5]}, 3, "text", None]}
        assert bodies[1] == {"temp": 21.5, "site": "kitchen",
                             "all": ["endpoint1", True, {"reading": {"temp": 21.5}, "site": "kitchen"}]}
        # a field the payload lacks is the request's fault, named by its path
        res = run(engine, "values", {"site": "kitchen"})
        assert res["status"] == "error" and res["error"]["code"] == "bad_request"
        assert res["error"]["message"] == "payload.reading.temp: no field 'reading' (it is an object there)"
        res = run(engine, "values", {"reading": [1]})
        assert res["error"]["message"] == "payload.reading.temp: no field 'temp' (it is a list there)"
        # a field an answer lacks is the component's
        res = run(engine, "deeper", "x")
        assert res["status"] == "error" and res["error"]["code"] == "component_error"
        assert res["error"]["message"].startswith("result1.nothing.here: no field 'nothing' (it is an object there)")
    finally:
        engine.kill()


# ----- the workers' time limits: one timer for all (core/deadlines.py) -------------------
def test_deadlines_cancel_only_what_is_due_and_a_stop_still_stops():
    import asyncio

    from runtime_manager.core.deadlines import Deadlines

    async def scenario() -> dict[str, str]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines()
        outcome: dict[str, str] = {}

        async def request(name: str, limit: float, takes: float, swallow: bool = False) -> None:
            task = asyncio.current_task()
            assert task is not None
            deadlines.start(task, loop, limit)
            try:
                try:
                    try:
                        await asyncio.sleep(takes)
                    except asyncio.CancelledError:
                        if not swallow:
                            raise
                        outcome[name + " swallowed"] = "yes"
                    outcome[name] = "done"
                except asyncio.CancelledError:
                    outcome[name] = "timeout" if deadlines.expired(task) else "stopped"
                    if outcome[name] == "stopped":
                        raise
                finally:
                    deadlines.end(task)
                # the task's next request starts clean: nothing left over from the last one
                assert task.cancelling() == 0
                deadlines.start(task, loop, 5)
                await asyncio.sleep(0.01)
                deadlines.end(task)
                outcome[name + " next"] = "done"
            except asyncio.CancelledError:
                outcome.setdefault(name + " next", "stopped")
                raise

        started = time.monotonic()
        tasks = [loop.create_task(request("quick", 0.3, 0.01)), loop.create_task(request("late", 0.1, 5)),
                 loop.create_task(request("later", 0.25, 5)), loop.create_task(request("swallows", 0.1, 5, True)),
                 loop.create_task(request("stopped", 0.2, 5))]
        await asyncio.sleep(0.19)
        tasks[4].cancel()  # a stop, before its time is up
        await asyncio.gather(*tasks, return_exceptions=True)
        outcome["took"] = f"{time.monotonic() - started:.2f}"
        return outcome

    out = asyncio.run(scenario())
    assert out["quick"] == "done" and out["quick next"] == "done"
    assert out["late"] == "timeout" and out["later"] == "timeout" and out["late next"] == out["later next"] == "done"
    assert out["swallows"] == "done" and out["swallows swallowed"] == "yes" and out["swallows next"] == "done"
    assert out["stopped"] == "stopped"
    assert float(out["took"]) < 1.0  # the later one was not held to the earlier's timer, nor to the 5 s sleeps


def test_many_requests_time_out_together_each_with_its_own_limit(make_engine):
    """Six of eight workers in a hanging step: every one of those requests ends
    with `timeout` at task_timeout_ms (none early, none late by much), and quick
    ones meanwhile are untouched."""
    node = make_engine(timeout_s=30, runtime={"task_timeout_ms": 400, "workers": 8})
    if True:
        results: list[tuple[float, dict]] = []
        lock = threading.Lock()
        started = time.monotonic()

        def finished(result: dict) -> None:
            with lock:
                results.append((time.monotonic() - started, result))

        for _ in range(6):
            node.submit(FlowRequest("hang", "x"), finished)
        for i in range(20):
            node.submit(FlowRequest("1", i), finished)
        wait_for(lambda: len(results) == 26, 10, "26 results")
        hung = [(t, r) for t, r in results if r["id_flow"] == "hang"]
        quick = [r for _t, r in results if r["id_flow"] == "1"]
        assert all(r["status"] == "ok" for r in quick)
        assert all(r["error"]["code"] == "timeout" for _t, r in hung)
        assert all(0.39 <= t < 1.5 for t, _r in hung), sorted(t for t, _r in hung)
        assert run(node, "1", 5)["status"] == "ok"  # the workers go on
