"""The demo behind `make cluster`: three nodes as one system on one broker.

  - the broker: Mosquitto on the port of config_files/comm.conf (or one already
    listening there);
  - test/mock_services.py: the components; on node 3 component1 is slow (/slow);
  - nodes 1, 2 and 3: `serve` processes made from config_files/, taking requests
    from one shared subscription (`$share/cluster/component_msg`), each
    publishing its status on rm/nodes/<id>, placing with `least_loaded`.

A stream of requests goes to the group; for each the demo prints where it ran
and why, and it prints the group's statuses as they change. Half-way node 2 is
stopped, then started again a quarter of the run later: its peers stop
forwarding to it at once, node 1 takes its MQTT session over a second later
(what the broker had queued for node 2 runs on node 1, and the broker stops
choosing node 2), and node 2 takes its share again when it is back.
Watch the statuses yourself with

    mosquitto_sub -p <port> -t 'rm/nodes/+' -v

    python demo_cluster.py [--requests 80] [--rate 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))

import paho.mqtt.client as mqtt  # noqa: E402

from demo import port_open, post_json, wait_port  # noqa: E402
from runtime_manager.config import load_config  # noqa: E402

NODES = ("1", "2", "3")


def node_configs(src: Path, dest: Path, rest_base: int) -> dict[str, Path]:
    """config_files/ made into three node configs that know each other."""
    nodes = {i: {"id": i, "config": {"protocol": "http", "ip": "127.0.0.1", "port": rest_base + k, "endpoint": "startrm"}}
             for k, i in enumerate(NODES)}
    out = {}
    for k, i in enumerate(NODES):
        d = dest / f"node{i}"
        shutil.copytree(src, d)
        comm = json.loads((d / "comm.conf").read_text())
        comm["mqtt"].update(shared_group="cluster", client_id=f"rm-cluster-{i}")
        comm["rest"]["port"] = rest_base + k
        (d / "comm.conf").write_text(json.dumps(comm, indent=2))
        runtime = json.loads((d / "runtime.conf").read_text())
        runtime.pop("orchestrator", None)
        runtime.update(node_id=i, status_interval_ms=500, workers=4, heartbeat_interval_ms=0,
                       module_dir=str(load_config(src).runtime.module_dir))
        (d / "runtime.conf").write_text(json.dumps(runtime, indent=2))
        (d / "nodes.conf").write_text(json.dumps(nodes, indent=2))
        (d / "load_balancer.conf").write_text(json.dumps({"policy": "least_loaded"}))
        if i == "3":  # the slow one
            comps = json.loads((d / "components.conf").read_text())
            comps["component1"]["config"]["endpoints"]["1"] = "slow"
            (d / "components.conf").write_text(json.dumps(comps, indent=2))
        out[i] = d
    return out


class Watcher:
    """Results and statuses, printed as they come."""

    def __init__(self, port: int, prefix: str = "rm/nodes") -> None:
        self.results: dict[str, dict] = {}
        self.states: dict[str, str] = {}
        self.loads: dict[str, float] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cluster-demo-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe([("component_msg/result", 1), (f"{prefix}/+", 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.cond:
            if msg.topic.startswith("rm/nodes/"):
                node, state = str(body.get("node")), body.get("state")
                if state != self.states.get(node):
                    print(f"  status: node {node} is {state}" + (f" ({body.get('reason')})" if body.get("reason") else ""))
                self.states[node] = state
                self.loads[node] = body.get("load", 0.0)
            else:
                self.results[str(body.get("request_id"))] = body
            self.cond.notify_all()

    def wait(self, rid: str, timeout: float = 30) -> dict | None:
        with self.cond:
            self.cond.wait_for(lambda: rid in self.results, timeout)
            return self.results.get(rid)

    def loads_line(self) -> str:
        with self.cond:
            return "  ".join(f"node {n}: {self.states.get(n, '?')} load {self.loads.get(n, 0):.2f}" for n in NODES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", default=str(ROOT / "config_files"))
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second")
    args = parser.parse_args()
    src = Path(args.config_dir).resolve()
    config = load_config(src)
    mqtt_port, mock_port = config.mqtt.port, next(iter(config.components.values())).port
    own = {"start_new_session": True}
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # stops as Ctrl-C does
    py = sys.executable
    procs: list[subprocess.Popen] = []
    (ROOT / "run").mkdir(exist_ok=True)
    log = open(ROOT / "run" / "cluster.log", "ab")
    workdir = Path(tempfile.mkdtemp(prefix="rm-cluster-"))
    nodes: dict[str, subprocess.Popen] = {}
    try:
        if not port_open(mqtt_port):
            mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            if not Path(mosquitto).exists():
                raise SystemExit("make cluster needs Mosquitto (apt-get install mosquitto; `make test` installs it)")
            procs.append(subprocess.Popen([mosquitto, "-c", str(src / "mosquitto.conf")], stdout=log, stderr=log, **own))
        wait_port(mqtt_port, "the MQTT broker")
        procs.append(subprocess.Popen([py, str(ROOT / "test" / "mock_services.py"), "--port", str(mock_port)],
                                      stdout=log, stderr=log, **own))
        wait_port(mock_port, "the mock services")
        post_json(f"http://127.0.0.1:{mock_port}/_control", {"slow_ms": 600})
        configs = node_configs(src, workdir, config.rest.port)

        def start(i: str) -> None:
            nodes[i] = subprocess.Popen([py, "-m", "runtime_manager", "serve", "--config-dir", str(configs[i])],
                                        cwd=ROOT, stdout=log, stderr=log, **own)

        for i in NODES:
            start(i)
        for k, _ in enumerate(NODES):
            wait_port(config.rest.port + k, f"node {NODES[k]}")
        print(f"cluster: 3 nodes on one broker (port {mqtt_port}); node 3's component1 is slow (600 ms). "
              f"Logs in run/cluster.log.\n  watch: mosquitto_sub -p {mqtt_port} -t 'rm/nodes/+' -v")
        watcher = Watcher(mqtt_port)
        time.sleep(1.5)  # statuses heard all round
        sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cluster-sender-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        sender.connect("127.0.0.1", mqtt_port)
        sender.loop_start()
        where: dict[str, int] = {}
        pending: list[tuple[int, str]] = []
        for n in range(args.requests):
            if n == args.requests // 2:
                print("cluster: stopping node 2 (SIGTERM)")
                nodes["2"].send_signal(signal.SIGTERM)
            if n == 3 * args.requests // 4:
                print("cluster: starting node 2 again")
                start("2")
            rid = f"c{n}-{uuid.uuid4().hex[:6]}"
            sender.publish("component_msg", json.dumps({"id_flow": "1", "payload": f"req {n}", "request_id": rid}), qos=1)
            pending.append((n, rid))
            time.sleep(1 / args.rate)
            while pending and pending[0][1] in watcher.results:
                _report(watcher, *pending.pop(0), where)
            if n % 10 == 9:
                print(f"  group: {watcher.loads_line()}")
        for n, rid in pending:
            if watcher.wait(rid) is not None:
                _report(watcher, n, rid, where)
            else:
                print(f"  #{n}: no result")
        print(f"cluster: {sum(where.values())} of {args.requests} answered; ran on " +
              ", ".join(f"node {k}: {v}" for k, v in sorted(where.items())))
        sender.loop_stop()
        watcher.client.loop_stop()
    except KeyboardInterrupt:
        pass
    finally:
        for p in [*nodes.values(), *reversed(procs)]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        print("cluster: stopped")


def _report(watcher: Watcher, n: int, rid: str, where: dict[str, int]) -> None:
    res = watcher.results[rid]
    node = str(res.get("node"))
    where[node] = where.get(node, 0) + 1
    placement = res.get("placement") or {}
    how = "forwarded" if placement.get("chosen", "home") != "home" else "at the node that took it"
    tried = f"; tried {placement['tried']}" if placement.get("tried") else ""
    print(f"  #{n:<3} {res.get('status')} on node {node} ({how}: {placement.get('reason', '')}{tried})")


if __name__ == "__main__":
    main()
