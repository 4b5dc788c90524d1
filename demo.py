"""The demo behind `make run`: a broker, the mock services and two nodes on the
shipped config_files/, then a few requests, then it keeps serving until Ctrl-C.

  - the broker: Mosquitto with config_files/mosquitto.conf when installed (or one
    already listening on the configured port), else an embedded amqtt broker
    (MQTT 3.1.1 only: the nodes are then told to speak 3.1.1);
  - test/mock_services.py on the components' port: components, load balancer, peers;
  - node 1: one `serve` process: MQTT, REST (comm.conf rest.port) and the orchestrator runtime;
  - node 2: rm_api on the port nodes.conf gives node 2, for forwarded requests.

    python demo.py [--config-dir config_files] [--once]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))

from runtime_manager.config import load_config  # noqa: E402


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def wait_port(port: int, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not come up on port {port}")


def post_json(url: str, body: dict) -> dict:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def start_embedded_broker(port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(Broker(config, loop=loop).start())
        loop.run_forever()

    threading.Thread(target=run, name="amqtt", daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", default=str(ROOT / "config_files"))
    parser.add_argument("--once", action="store_true", help="send the sample requests, then stop")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                        help="auto: one already listening, else Mosquitto when installed, else embedded")
    args = parser.parse_args()
    config_dir = Path(args.config_dir).resolve()
    config = load_config(config_dir)
    procs: list[subprocess.Popen] = []
    # Each process in a session of its own: Ctrl-C reaches only this script, which
    # then stops each process with one SIGTERM (a second signal would kill a node).
    own = {"start_new_session": True}
    # a SIGTERM (a service manager, `kill`) stops everything as Ctrl-C does, at any point
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    py = sys.executable
    mqtt_port = config.mqtt.port

    mosquitto = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    (ROOT / "run").mkdir(exist_ok=True)
    if port_open(mqtt_port):
        print(f"demo: using the MQTT broker already listening on port {mqtt_port}")
    elif mosquitto and args.broker != "embedded":
        print(f"demo: starting Mosquitto on port {mqtt_port} with config_files/mosquitto.conf (log in run/mosquitto.log)")
        log = open(ROOT / "run" / "mosquitto.log", "ab")
        procs.append(subprocess.Popen([mosquitto, "-c", str(config_dir / "mosquitto.conf")], stdout=log, stderr=log, **own))
    else:
        print(f"demo: Mosquitto is not installed; starting the embedded amqtt broker on port {mqtt_port} (MQTT 3.1.1)")
        start_embedded_broker(mqtt_port)
        copy = Path(tempfile.mkdtemp(prefix="rm-demo-"))
        shutil.copytree(config_dir, copy, dirs_exist_ok=True)
        comm = json.loads((copy / "comm.conf").read_text())
        comm["mqtt"]["protocol"] = "3.1.1"
        (copy / "comm.conf").write_text(json.dumps(comm, indent=2))
        runtime_path = copy / "runtime.conf"
        runtime = json.loads(runtime_path.read_text()) if runtime_path.exists() else {}
        runtime["module_dir"] = str(config.runtime.module_dir)  # the copy lives elsewhere
        runtime_path.write_text(json.dumps(runtime, indent=2))
        config_dir = copy
        config = load_config(config_dir)
    wait_port(mqtt_port, "the MQTT broker")

    mock_port = next(iter(config.components.values())).port if config.components else 6000
    procs.append(subprocess.Popen([py, str(ROOT / "test" / "mock_services.py"), "--port", str(mock_port)], **own))
    wait_port(mock_port, "the mock services")

    cd = ["--config-dir", str(config_dir)]
    procs.append(subprocess.Popen([py, "-m", "runtime_manager", "serve", *cd], cwd=ROOT, **own))
    wait_port(config.rest.port, "node 1 (serve)")
    peer = config.nodes.get("2")
    if peer is not None and peer.ip == "127.0.0.1" and peer.port != config.rest.port:
        node2 = [py, "-m", "runtime_manager.rm_api", *cd, "--node-id", "2", "--port", str(peer.port)]
        procs.append(subprocess.Popen(node2, cwd=ROOT, **own))
        wait_port(peer.port, "node 2 (rm_api)")

    try:
        from publish import request as mqtt_request

        time.sleep(1.0)
        print("\ndemo: sample requests")
        samples = [("1", "0x03abcdefghil"), ("2", {"temperature": 21.5}), ("3", None), ("4", [1, 2, 3])]
        for flow, payload in samples:
            if flow not in config.flows:
                continue
            result = mqtt_request(config.mqtt, flow, payload, timeout=10)
            print(f"  MQTT flow {flow} -> {json.dumps(result)[:300]}")
        rest = f"http://127.0.0.1:{config.rest.port}{config.rest.endpoint}"
        if peer is not None and config.load_balancer.policy == "external":
            post_json(f"http://127.0.0.1:{mock_port}/_control", {"lb_answer": 2})
            result = post_json(rest, {"id_flow": "1", "is_load_balancing": False, "payload": "via REST"})
            print(f"  REST flow 1, load balancer says node 2 -> node {result.get('node')}, placement {result.get('placement')}")
            post_json(f"http://127.0.0.1:{mock_port}/_control", {"lb_answer": None})
        orch = config.runtime.orchestrator
        if orch is not None:
            tool = [py, "-m", "runtime_manager", "run", "--runtime", orch.name, "--file", "args.wat",
                    "--argv", "hello", "from", "the", "demo", "--wait", "10", "--timeout", "20", *cd]
            ran = subprocess.run(tool, cwd=ROOT, capture_output=True, text=True, timeout=60)
            output = " | ".join(ran.stdout.splitlines())
            print(f"  module args.wat on runtime {orch.name} -> stdout: {output}; {ran.stderr.strip()}")
        rel = Path(os.path.relpath(py, ROOT))
        pyname = str(rel) if not str(rel).startswith("..") else py
        print(f"""
demo: running. Try (from {ROOT}):
  {pyname} test/publish.py --flow 1 --payload '"hello"'
  curl -s -X POST http://127.0.0.1:{config.rest.port}{config.rest.endpoint} -H 'Content-Type: application/json' \\
       -d '{{"id_flow": "1", "is_load_balancing": false, "payload": "0x03abcdefghil"}}'
  curl -s -X POST http://127.0.0.1:{mock_port}/_control -d '{{"lb_answer": 2}}'   # the load balancer now says node 2
  {pyname} -m runtime_manager run --runtime node1 --file ticker.wat   # a WebAssembly module on this node's runtime
  {pyname} -m runtime_manager list                                    # in another shell: runtimes and modules
  {pyname} -m runtime_manager reload --all                            # both nodes read config_files/ again
Postman: import test/postman_collection.json. Ctrl-C stops everything.""")
        if not args.once:
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            print("demo: a process ended; stopping")
    except KeyboardInterrupt:
        pass
    finally:
        for p in reversed(procs):  # nodes first, the broker last: nodes deregister through it
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        print("demo: stopped")


if __name__ == "__main__":
    main()
