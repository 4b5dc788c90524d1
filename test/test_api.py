"""rm_api as a real process: the REST API over real HTTP."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
import requests
from conftest import RmProcess, write_config
from helpers import free_port, wait_for

FLOWS = "1\nTO component1 1\nPOST payload\nTO component2 1\nPOST result1\nTO component3 1\nPOST result1 result2\n\n" \
        "3\nTO component1 2\nGET\n\nfail\nTO broken fail\nGET\n\nhang\nTO broken hang\nGET\n\nslow\nTO broken slow\nGET\n"


def broken(port: int) -> dict:
    return {"broken": {"id": 7, "config": {"protocol": "http", "ip": "127.0.0.1", "port": port, "timeout_s": 0.5,
                                           "endpoints": {"fail": "fail", "hang": "hang", "slow": "slow"}}}}


@pytest.fixture
def api(tmp_path: Path, mock, processes) -> tuple[str, RmProcess]:
    port = free_port()
    cfg = write_config(tmp_path / "cfg", mock.port, rest_port=port, flows=FLOWS, components=broken(mock.port),
                       runtime={"node_id": "1"})
    p = RmProcess("rm_api", cfg).start("REST on")
    processes.append(p)
    return f"http://127.0.0.1:{port}", p


def post(base: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{base}/startrm", data=data, headers={"Content-Type": "application/json"}, timeout=20, **kw)


def test_health_and_status(api):
    base, _ = api
    r = requests.get(f"{base}/health", timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    status = requests.get(f"{base}/status", timeout=5).json()
    assert status["node"] == "1" and status["accepting"] is True


def test_run_flow_over_rest(api, mock):
    base, _ = api
    r = post(base, {"id_flow": "1", "is_load_balancing": False, "payload": "0x03abcdefghil"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["status"] == "ok" and res["node"] == "1" and len(res["results"]) == 3
    assert res["results"][0]["payload"] == ["0x03abcdefghil"]
    assert mock.calls["LB/id_node"] == 1


def test_forwarded_request_runs_at_home_without_asking(api, mock):
    base, _ = api
    mock.lb_answer = 2
    res = post(base, {"id_flow": 3, "is_load_balancing": True}).json()
    assert res["status"] == "ok" and res["node"] == "1" and mock.calls["LB/id_node"] == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "bad_request"),
        (b"\xff\xfe", 400, "bad_request"),
        (b"[1]", 400, "bad_request"),
        ({"payload": 1}, 400, "bad_request"),
        ({"id_flow": "1", "is_load_balancing": "yes"}, 400, "bad_request"),
        ({"id_flow": "42"}, 404, "unknown_flow"),
        ({"id_flow": "fail"}, 502, "component_error"),
        ({"id_flow": "hang"}, 504, "timeout"),
    ],
)
def test_error_statuses(api, body, status, code):
    base, proc = api
    r = post(base, body)
    assert r.status_code == status, r.text
    res = r.json()
    assert res["status"] == "error" and res["error"]["code"] == code
    assert proc.alive
    assert post(base, {"id_flow": "3"}).status_code == 200  # keeps serving


def test_component_error_names_step_component_and_endpoint(api):
    base, _ = api
    err = post(base, {"id_flow": "fail"}).json()["error"]
    assert (err["step"], err["component"], err["endpoint"]) == (1, "broken", "fail")


def test_unknown_route_and_wrong_method(api):
    base, _ = api
    assert requests.get(f"{base}/nope", timeout=5).status_code == 404
    r = requests.get(f"{base}/startrm", timeout=5)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_body_too_large_is_413(tmp_path, mock, processes):
    port = free_port()
    cfg = write_config(tmp_path / "cfg", mock.port, rest_port=port, comm={"rest": {"max_body_bytes": 1000}})
    p = RmProcess("rm_api", cfg).start("REST on")
    processes.append(p)
    r = post(f"http://127.0.0.1:{port}", {"id_flow": "1", "payload": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "bad_request"
    assert post(f"http://127.0.0.1:{port}", {"id_flow": "3"}).status_code == 200


def test_bearer_token(tmp_path, mock, processes):
    port = free_port()
    cfg = write_config(tmp_path / "cfg", mock.port, rest_port=port, comm={"rest": {"token": "s3cret"}})
    p = RmProcess("rm_api", cfg).start("REST on")
    processes.append(p)
    base = f"http://127.0.0.1:{port}"
    assert requests.get(f"{base}/health", timeout=5).status_code == 401
    assert post(base, {"id_flow": "3"}).status_code == 401
    assert post(base, {"id_flow": "3"}, ).json()["error"]["code"] == "unauthorized"
    ok = requests.post(f"{base}/startrm", json={"id_flow": "3"}, headers={"Authorization": "Bearer s3cret"}, timeout=10)
    assert ok.status_code == 200


def test_two_nodes_forward_over_rest(tmp_path, mock, processes):
    """Node 1 asks the load balancer, which says node 2; node 2 runs the flow."""
    p1, p2 = free_port(), free_port()
    nodes = {str(n): {"id": n, "config": {"protocol": "http", "ip": "127.0.0.1", "port": port, "endpoint": "startrm"}}
             for n, port in ((1, p1), (2, p2))}
    cfg1 = write_config(tmp_path / "n1", mock.port, rest_port=p1, nodes=nodes, runtime={"node_id": "1"})
    cfg2 = write_config(tmp_path / "n2", mock.port, rest_port=p2, nodes=nodes, runtime={"node_id": "2"})
    for cfg in (cfg1, cfg2):
        processes.append(RmProcess("rm_api", cfg).start("REST on"))
    mock.lb_answer = 2
    res = post(f"http://127.0.0.1:{p1}", {"id_flow": "1", "payload": "hi"}).json()
    assert res["status"] == "ok" and res["node"] == "2"
    assert res["placement"] == {"asked": "lb", "chosen": "node 2", "reason": "load balancer said 2"}
    assert mock.calls["LB/id_node"] == 1  # node 2 did not ask again
    # an unknown flow on the peer is the peer's answer, not a reason to run at home
    res = post(f"http://127.0.0.1:{p1}", {"id_flow": "nope"})
    assert res.status_code == 404 and res.json()["node"] == "2"
    # node 2 goes away: node 1 runs the flow itself and says why
    processes[-1].stop(signal.SIGKILL)
    res = post(f"http://127.0.0.1:{p1}", {"id_flow": "1", "payload": "hi"}).json()
    assert res["status"] == "ok" and res["node"] == "1" and "node 2 is down" in res["placement"]["reason"]


def test_sigterm_answers_in_flight_requests_then_exits_0(api, mock):
    base, proc = api
    mock.slow_ms = 400
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(post(base, {"id_flow": "slow"}).status_code)) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: mock.calls["slow"] >= 4, 10, "requests in flight")
    assert proc.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join(10)
    assert answers == [200] * 4
