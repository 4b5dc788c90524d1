"""`reload`: have running nodes read their configuration directory again.

One node is found by its REST port (`GET /status`) or given by its process,
and signalled (SIGHUP); the outcome is read back from its status. `--all`
reaches every node of this host that runs on the directory: those that publish
a status are asked over the broker, on their control topic (every worker of a
`serve --processes` node listens there), and answer with the outcome; those
that publish none (a REST-only `rm_api`, say) are found on the REST ports the
directory names (its own and its peers' on this host) and signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.request
import uuid
from typing import Any

from .config import Config
from .core.topics import node_control_topic, status_filters

WAIT_S = 15.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "")


def rest_status(url: str, token: str | None) -> dict[str, Any] | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            answer = json.loads(resp.read())
            return answer if isinstance(answer, dict) else None
    except (OSError, ValueError):
        return None


def _instance_pid(status: dict[str, Any]) -> int | None:
    """The process that stands for a node: its supervisor's under `serve --processes`."""
    pid = (status.get("worker") or {}).get("supervisor_pid") or status.get("pid")
    return pid if isinstance(pid, int) else None


def reload_by_signal(url: str, token: str | None, pid: int | None = None) -> tuple[bool, str]:
    """SIGHUP the node answering on `url` (or process `pid`) and read the outcome
    back from its status. (whether it reloaded, what to print)."""
    before = rest_status(url, token)
    if pid is None:
        if before is None or _instance_pid(before) is None:
            return False, f"no node answers on {url}; give its process with --pid"
        pid = _instance_pid(before)
    assert pid is not None
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return False, f"cannot signal process {pid}: {exc}"
    if before is None:
        return True, f"asked process {pid} to reload"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = rest_status(url, token)
        if now and now.get("config", {}).get("reloads", 0) > before.get("config", {}).get("reloads", 0):
            last = now["config"]["last_reload"]
            return bool(last.get("ok")), json.dumps(last, indent=2)
    return False, f"asked process {pid} to reload; it did not report the outcome within {WAIT_S:g} s (see its log)"


def reload_one(config: Config, port: int | None, pid: int | None) -> int:
    rest = config.rest
    host = "127.0.0.1" if rest.host in LOCAL_HOSTS else rest.host
    ok, text = reload_by_signal(f"http://{host}:{port or rest.port}/status", rest.token, pid)
    print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _over_broker(config: Config) -> tuple[dict[str, dict[str, Any] | None], set[int]]:
    """Ask the nodes of this host whose statuses name the directory. Returns
    each node's outcome (None: no answer) and the processes that stand for them."""
    from .tools import Session  # paho only where the broker is asked

    prefix, me = config.runtime.status_prefix, socket.gethostname()
    reply = f"{prefix}/tools/reload-{uuid.uuid4().hex[:12]}"
    try:
        session = Session(config, [*status_filters(prefix), reply])
    except SystemExit as exc:  # the broker is out of reach: only the REST nodes can be asked
        print(f"the broker: {exc}; asking the nodes found over REST only", file=sys.stderr)
        return {}, set()
    try:
        time.sleep(0.3)  # the retained statuses come right after the subscription
        nodes: dict[str, dict[str, Any]] = {}
        for _topic, payload, _retained in list(session.messages):
            try:
                status = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(status, dict) or status.get("state") != "online":
                continue
            interval_s = max(1.0, (status.get("interval_ms") or 1000) / 1000)
            fresh = time.time() - float(status.get("time") or 0) < 3 * interval_s
            instance = status.get("instance") or {}
            if fresh and instance.get("host") == me and status.get("config_dir") == str(config.dir):
                nodes[str(status.get("node"))] = status
        command_id = str(uuid.uuid4())
        for node in sorted(nodes):
            session.publish(node_control_topic(prefix, node), {"command": "reload", "id": command_id, "reply_to": reply})

        def answers() -> dict[str, dict[str, Any]]:
            found = {}
            for topic, payload, _r in list(session.messages):
                try:
                    answer = json.loads(payload) if topic == reply else None
                except ValueError:
                    continue
                if isinstance(answer, dict) and answer.get("id") == command_id:
                    found[str(answer.get("node"))] = answer.get("reload") or {}
            return found

        if nodes:
            with session.cond:
                session.cond.wait_for(lambda: set(answers()) >= set(nodes), WAIT_S)
        got = answers()
    finally:
        session.close()
    pids = {p for p in ((s.get("instance") or {}).get("pid") for s in nodes.values()) if isinstance(p, int)}
    return {node: got.get(node) for node in nodes}, pids


def _rest_ports(config: Config) -> list[int]:
    """The REST ports of this host the directory names: its own, its peers' on loopback."""
    ports = [config.rest.port]
    ports += [p.port for p in config.nodes.values() if p.ip in LOCAL_HOSTS and p.port not in ports]
    return ports


def reload_all(config: Config) -> int:
    """Every running node of this host on this directory reads it again."""
    outcomes, reached = _over_broker(config)
    lines, ok = [], True
    for node in sorted(outcomes):
        outcome = outcomes[node]
        if outcome is None:
            ok = False
            lines.append(f"node {node}: no answer within {WAIT_S:g} s (see its log)")
        else:
            ok = ok and bool(outcome.get("ok"))
            lines.append(f"node {node}: {json.dumps(outcome)}")
    tokens = {config.rest.port: config.rest.token, **{p.port: p.token for p in config.nodes.values()}}
    for port in _rest_ports(config):
        url = f"http://127.0.0.1:{port}/status"
        status = rest_status(url, tokens.get(port))
        if status is None or status.get("config", {}).get("dir") != str(config.dir) or _instance_pid(status) in reached:
            continue  # nobody there, another directory, or asked over the broker already
        done, text = reload_by_signal(url, tokens.get(port), _instance_pid(status))
        ok = ok and done
        reached.add(_instance_pid(status) or 0)
        lines.append(f"node {status.get('node')} (REST port {port}, no status on the broker): {' '.join(text.split())}")
    if not lines:
        print(f"no running node of this host uses {config.dir} (no status on '{config.runtime.status_prefix}/+', "
              f"nothing on the REST ports it names)", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0 if ok else 1
