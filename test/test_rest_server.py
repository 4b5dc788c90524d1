"""The REST hot path served on the node's loop answers byte for byte what the
Flask app (the definition of the API) answers: every status a flow request can
get, bad input, auth; and the server's own limits answer in the same JSON."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import requests
from conftest import write_config
from helpers import InProcessNode, free_port
from mock_services import MockServices

from runtime_manager.config import load_config

TOKEN = "t0ken"
FLOWS = """1
TO component1 1
POST payload
TO component2 1
POST result1

fail
TO component1 fail
GET

hang
TO component1 hang
GET

answer
TO component1 1
POST BODY {"v": payload.v}
RETURN result1.v

guard
IF payload.ok missing
  FAIL "ok is needed"
END
TO component1 1
GET
"""


@pytest.fixture
def node(tmp_path: Path, mock: MockServices):
    components = {"component1": {"id": 1, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port,
                                                     "endpoints": {"1": "endpoint1", "fail": "fail", "hang": "hang"},
                                                     "timeout_s": 5}}}
    cfg = write_config(tmp_path / "cfg", mock.port, rest_port=free_port(), flows=FLOWS, components=components,
                       comm={"rest": {"token": TOKEN, "max_body_bytes": 4096}},
                       runtime={"task_timeout_ms": 500, "node_id": "9"})
    n = InProcessNode(load_config(cfg), rest=True).start()
    yield n
    n.kill()


def _same(text: bytes) -> bytes:
    """The one part of an answer that differs between two runs: the time taken."""
    return re.sub(rb'"elapsed_ms":[0-9.e+-]+', b'"elapsed_ms":0', text)


AUTH = {"Authorization": f"Bearer {TOKEN}"}
CASES = [
    ("ok", b'{"id_flow": "1", "payload": {"a": [1, 2]}, "request_id": "r-1"}', AUTH),
    ("a number id", b'{"id_flow": 1, "payload": 3, "request_id": 17}', AUTH),
    ("RETURN", b'{"id_flow": "answer", "payload": {"v": "x"}, "request_id": "r-2"}', AUTH),
    ("FAIL", b'{"id_flow": "guard", "payload": {}, "request_id": "r-3"}', AUTH),
    ("unknown flow", b'{"id_flow": "nope", "request_id": "r-4"}', AUTH),
    ("component error", b'{"id_flow": "fail", "request_id": "r-5"}', AUTH),
    ("timeout", b'{"id_flow": "hang", "request_id": "r-6"}', AUTH),
    ("not JSON", b"{not json", AUTH),
    ("no id_flow", b'{"payload": 1}', AUTH),
    ("a list", b"[1, 2]", AUTH),
    ("empty", b"", AUTH),
    ("a bad request_id", b'{"id_flow": "1", "request_id": {"x": 1}}', AUTH),
    ("no token", b'{"id_flow": "1", "request_id": "r-7"}', {}),
    ("a wrong token", b'{"id_flow": "1", "request_id": "r-8"}', {"Authorization": "Bearer nope"}),
    ("the scheme in lower case", b'{"id_flow": "1", "request_id": "r-9"}', {"Authorization": f"bearer {TOKEN}"}),
    ("too large", b'{"id_flow": "1", "payload": "' + b"x" * 5000 + b'"}', AUTH),
]


@pytest.mark.parametrize(("what", "body", "headers"), CASES, ids=[c[0] for c in CASES])
def test_a_flow_request_is_answered_as_the_flask_app_answers_it(node, what, body, headers):
    rest = node.node.rest
    live = requests.post(f"http://127.0.0.1:{rest.port}/startrm", data=body, headers=headers, timeout=10)
    flask = rest.app.test_client().post("/startrm", data=body, headers=headers)
    assert live.status_code == flask.status_code, (what, live.content, flask.data)
    assert live.headers["Content-Type"] == flask.headers["Content-Type"] == "application/json"
    assert _same(live.content) == _same(flask.data), what
    assert int(live.headers["Content-Length"]) == len(live.content)


@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("GET", "/livez"), ("GET", "/nope"),
                                              ("GET", "/startrm"), ("PUT", "/health"), ("GET", "/openapi.json"),
                                              ("GET", "/ui"), ("DELETE", "/startrm")])
def test_the_other_routes_are_the_flask_apps(node, method, path):
    rest = node.node.rest
    live = requests.request(method, f"http://127.0.0.1:{rest.port}{path}", headers=AUTH, timeout=10)
    flask = rest.app.test_client().open(path, method=method, headers=AUTH)
    assert (live.status_code, live.content) == (flask.status_code, flask.data)
    assert live.headers["Content-Type"] == flask.headers["Content-Type"]
    assert live.headers.get("Allow") == flask.headers.get("Allow")


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_what_the_server_answers_itself_is_json_and_closes(node):
    port = node.node.rest.port
    malformed = _raw(port, b"GARBAGE / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert malformed.startswith(b"HTTP/1.1 400 ") and b'"code":"bad_request"' in malformed
    assert b"Connection: close" in malformed
    chunked = _raw(port, b"POST /startrm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                   + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 5000 + b"x" * 5000 + b"\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 413 ") and b"body larger than 4096 bytes" in chunked
    assert b'"id_flow":null' in chunked  # a flow request's refusal, as the app answers it
    endless = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"y" * 70_000 + b"\r\n\r\n")
    assert endless.startswith(b"HTTP/1.1 400 ") and b"headers larger than 64 KiB" in endless
    assert requests.get(f"http://127.0.0.1:{port}/livez", headers=AUTH, timeout=5).status_code == 200


def test_keep_alive_and_pipelined_requests_are_answered_in_order(node):
    port = node.node.rest.port
    one = (b'POST /startrm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n')
    bodies = [b'{"id_flow": "1", "payload": %d, "request_id": "p-%d"}' % (i, i) for i in range(5)]
    data = b"".join(one % (TOKEN.encode(), len(b)) + b for b in bodies)
    data += b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nConnection: close\r\n\r\n"
    answers = _raw(port, data)
    ids = re.findall(rb'"request_id":"(p-\d)"', answers)
    assert ids == [b"p-0", b"p-1", b"p-2", b"p-3", b"p-4"]
    assert answers.count(b"HTTP/1.1 200 OK") == 6 and answers.endswith(b'{"status":"ok"}')


def test_a_client_that_expects_100_continue_gets_it_at_once(node):
    """curl sends `Expect: 100-continue` before a body over 1 KiB and waits (1 s) for it."""
    port = node.node.rest.port
    body = b'{"id_flow": "1", "payload": "' + b"x" * 2000 + b'", "request_id": "big"}'
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /startrm HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while b'"request_id":"big"' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK")


def test_a_connection_in_use_stays_open_an_idle_one_closes_and_a_slow_answer_is_waited_for(tmp_path, mock):
    """`rest.idle_timeout_s` counts from the last bytes in or answer out: a
    keep-alive connection asked something every 0.15 s for three timeouts stays
    open; left alone, it is closed about one timeout later; a request whose
    answer takes longer than the timeout is answered, not cut off."""
    components = {"component1": {"id": 1, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port,
                                                     "endpoints": {"1": "endpoint1", "slow": "slow"},
                                                     "timeout_s": 5}}}
    cfg = write_config(tmp_path / "cfg", mock.port, rest_port=free_port(), components=components,
                       flows="1\nTO component1 1\nPOST payload\n\nslow\nTO component1 slow\nGET\n",
                       comm={"rest": {"idle_timeout_s": 0.5}}, runtime={"node_id": "9"})
    node = InProcessNode(load_config(cfg), rest=True).start()
    try:
        port = node.node.rest.port

        def ask(sock: socket.socket, body: bytes) -> bytes:
            sock.sendall(b"POST /startrm HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            answer = b""
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                    re.search(rb"Content-Length: (\d+)", answer).group(1) if b"Content-Length" in answer else 1 << 30):
                chunk = sock.recv(65536)
                assert chunk, f"closed by the server after {answer!r}"
                answer += chunk
            return answer

        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            started = time.monotonic()
            while True:
                assert ask(sock, b'{"id_flow": "1", "payload": 1}').startswith(b"HTTP/1.1 200 ")
                last = time.monotonic()
                if last - started > 1.5:
                    break
                time.sleep(0.15)
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the server...
            assert 0.4 < time.monotonic() - last < 2.0  # ...about one timeout after the last answer
        requests.post(f"http://127.0.0.1:{mock.port}/_control", json={"slow_ms": 900}, timeout=5)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            answer = ask(sock, b'{"id_flow": "slow", "payload": 1}')  # the service answers after 0.9 s
            assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        node.kill()
