"""What a forwarded flow costs: flow 1 of the original run at home on node 2,
against the same flow sent to a node whose load balancer says "node 2", so
that it forwards it (node 1 over REST, node 3 over MQTT) and node 2 runs it.
CPU per flow is both nodes' summed; the ratio is forwarded ÷ home.

    .venv/bin/python bench/forward_bench.py [--rounds 6] [--requests 2000] [--qos 0]
                                            [--count-messages] [--profile] [--syscalls]

One Mosquitto (the README's settings), two fast services (bench/fast_service.py:
the components, answering the load balancer "null"; and the forwarding nodes'
load balancer, answering "2"), three `serve` nodes: node 2, node 1 (forwarding
over REST) and node 3 (over MQTT), both to node 2. Node 3 shares node 2's
`mqtt.topic` (a node forwards over MQTT only to peers of its own topic), and
each node is sent its requests on its own topic (`<topic>/node/<id>`). QoS 0
bursts as in bench.py, the order of the three flipped every round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import ROOT, LoadGenerator, free_port, run_burst, wait_port


def node_config(dest: Path, node_id: str, broker: int, topic: str, service: int, lb: int, peers: dict) -> Path:
    dest.mkdir(parents=True)
    source = ROOT / "test" / "fractal_original"
    (dest / "components.conf").write_bytes((source / "components.conf").read_bytes().replace(b"6000", str(service).encode()))
    (dest / "flows.conf").write_bytes((source / "flows.conf").read_bytes())
    (dest / "load_balancer.conf").write_text(json.dumps(
        {"protocol": "http", "ip": "127.0.0.1", "port": lb, "endpoint": "LB/id_node"}))
    (dest / "nodes.conf").write_text(json.dumps(peers))
    rest = free_port()
    (dest / "comm.conf").write_text(json.dumps({
        "mqtt": {"topic": topic, "host": "127.0.0.1", "port": broker, "keepalive": 60, "qos": 1,
                 "client_id": f"fwd-{node_id}-{topic}-{os.getpid()}"},
        "rest": {"endpoint": "/startrm", "port": rest}, "log": {"level": "WARNING"}}))
    (dest / "runtime.conf").write_text(json.dumps({"node_id": node_id, "heartbeat_interval_ms": 0, "queue_depth": 8192}))
    return dest


class MessageCounter:
    """Messages and what they carry (a batch: its length; anything else: one) by topic."""

    def __init__(self, port: int, topics: tuple[str, ...]) -> None:
        import threading

        import orjson
        import paho.mqtt.client as mqtt

        self.counts: dict[str, list[int]] = {}
        ready = threading.Event()

        def counted(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
            body = orjson.loads(msg.payload)
            if msg.topic.endswith("/node/2") and not (isinstance(body, list) or body.get("is_load_balancing")):
                return  # a request sent to node 2 to run at home
            topic = msg.topic if "/answers/" not in msg.topic else msg.topic.rsplit("/", 1)[0] + "/…"
            entry = self.counts.setdefault(topic, [0, 0])
            entry[0] += 1
            entry[1] += len(body) if isinstance(body, list) else 1

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"count-{os.getpid()}", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: [c.subscribe(t, qos=0) for t in topics]
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = counted
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    parser.add_argument("--count-messages", action="store_true",
                        help="count the MQTT messages the forwards to node 2 and their answers take (one more "
                             "subscriber on the broker while measuring)")
    parser.add_argument("--syscalls", action="store_true",
                        help="count each node's system calls per flow (strace -c) in one more burst of each kind: "
                             "a count, unlike CPU time, does not move with the machine's load")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy on node 1 and node 2 during the REST forwards (bench/profiles/forward_*.txt)")
    args = parser.parse_args()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="rm-forward-") as tmp:
        work = Path(tmp)
        log = open(work / "procs.log", "ab")
        broker, service, lb = free_port(), free_port(), free_port()
        conf = (ROOT / "config_files" / "mosquitto.conf").read_text().replace("listener 1883", f"listener {broker}")
        if os.geteuid() == 0:
            conf += "user root\n"
        (work / "mosquitto.conf").write_text(conf)
        try:
            procs.append(subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                           str(work / "mosquitto.conf")], stdout=log, stderr=log))
            for port, answer in ((service, "null"), (lb, "2")):
                procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "fast_service.py"), "--port",
                                               str(port), "--lb-answer", answer], stdout=log, stderr=log))
            for port in (broker, service, lb):
                wait_port(port)
            home = node_config(work / "n2", "2", broker, "home", service, service, {})
            rest2 = json.loads((home / "comm.conf").read_text())["rest"]["port"]
            peer = {"id": 2, "config": {"protocol": "http", "ip": "127.0.0.1", "port": rest2, "endpoint": "startrm"}}
            over_rest = node_config(work / "n1r", "1", broker, "via-rest", service, lb, {"2": peer})
            # node 3 forwards over MQTT only to the request topic of a peer of its
            # own group (`<mqtt.topic>/node/<id>`): it shares node 2's topic and is
            # sent its requests on its own topic (as node 2 is, for the home runs)
            over_mqtt = node_config(work / "n3m", "3", broker, "home", service, lb,
                                    {"2": {**peer, "config": {**peer["config"], "forward": "mqtt"}}})
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            nodes = {}
            for name, cfg in (("home", home), ("via-rest", over_rest), ("via-mqtt", over_mqtt)):
                p = subprocess.Popen([sys.executable, "-m", "runtime_manager", "serve", "--config-dir", str(cfg)],
                                     stdout=log, stderr=log, cwd=ROOT, env=env)
                procs.append(p)
                nodes[name] = psutil.Process(p.pid)
            time.sleep(4.0)  # the statuses: node 1 learns node 2's request topic
            gone = [name for name, p in zip(nodes, procs[-3:], strict=True) if p.poll() is not None]
            if gone:
                tail = (work / "procs.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"node(s) {', '.join(gone)} did not start:\n{tail}")
            gen = LoadGenerator(broker)
            counter = MessageCounter(broker, ("home/node/2", "home/node/3/answers/#")) if args.count_messages else None

            class Target:  # what run_burst needs of a setup: where to send, whose CPU to count
                def __init__(self, topic: str, counted: list[psutil.Process]) -> None:
                    self.topic, self.counted = topic, counted

                def cpu_s(self) -> float:
                    self.last = [sum(p.cpu_times()[:2]) for p in self.counted]
                    return sum(self.last)

            targets = {"at home on node 2": Target("home/node/2", [nodes["home"]]),
                       "forwarded over REST (node 1 + node 2)": Target("via-rest", [nodes["via-rest"], nodes["home"]]),
                       "forwarded over MQTT (node 3 + node 2)": Target("home/node/3", [nodes["via-mqtt"], nodes["home"]])}
            rows: dict[str, list[dict]] = {}
            try:
                for target in targets.values():
                    gen.topic = target.topic
                    run_burst(target, gen, f"warmup {target.topic}", 300, args.qos)  # type: ignore[arg-type]
                if args.syscalls:
                    for label, target in targets.items():
                        count_syscalls(label, target, gen, args)
                if args.profile:
                    profile(nodes, targets["forwarded over REST (node 1 + node 2)"], gen, args, "via-rest")
                    profile(nodes, targets["forwarded over MQTT (node 3 + node 2)"], gen, args, "via-mqtt")
                order = list(targets.items())
                for rnd in range(args.rounds):
                    for label, target in (order if rnd % 2 == 0 else order[::-1]):
                        gen.topic = target.topic
                        before = target.cpu_s() and list(target.last)
                        row = run_burst(target, gen, f"{target.topic} r{rnd}", args.requests, args.qos)  # type: ignore[arg-type]
                        row["each_us"] = [(b - a) / args.requests * 1e6 for a, b in zip(before, target.last, strict=True)]
                        rows.setdefault(label, []).append(row)
                        print(f"{label:40} round {rnd}: {row['flows_per_s']:6.0f} flows/s, "
                              f"{row['cpu_us_per_flow']:5.0f} µs CPU per flow, lost {row['lost']}, "
                              f"errors {row['errors']}", flush=True)
            finally:
                gen.close()
                if counter is not None:
                    counter.close()
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in reversed(procs):
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
    if counter is not None:
        forwarded = args.requests * args.rounds + 300 + (3 * args.requests if args.profile else 0)
        for topic, (messages, items) in sorted(counter.counts.items()):
            print(f"{topic}: {messages} messages carried {items} requests or answers "
                  f"({items / max(1, messages):.1f} each; {forwarded} forwarded over MQTT)")
    home = rows["at home on node 2"]
    home_cpu = statistics.median(r["cpu_us_per_flow"] for r in home)
    print(f"\nQoS {args.qos} bursts of {args.requests}, median of {args.rounds} rounds; the last column: the "
          f"median of each round's ratio to the home run beside it (the machine's mood drifts between rounds)")
    print("| flow 1 | flows/s | CPU µs per flow (both nodes: forwarding + home) | vs at home | per round, median (range) |\n"
          "|---|---|---|---|---|")
    for label, rs in rows.items():
        cpu = statistics.median(r["cpu_us_per_flow"] for r in rs)
        ratios = [r["cpu_us_per_flow"] / h["cpu_us_per_flow"] for r, h in zip(rs, home, strict=True)]
        each = " + ".join(f"{statistics.median(r['each_us'][i] for r in rs):.0f}" for i in range(len(rs[0]["each_us"])))
        print(f"| {label} | {statistics.median(r['flows_per_s'] for r in rs):.0f} | {cpu:.0f} ({each}) | {cpu / home_cpu:.2f}× | "
              f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |")


def count_syscalls(label: str, target: object, gen: LoadGenerator, args: argparse.Namespace) -> None:
    """System calls per flow of each counted node during one burst (strace -c, all threads)."""
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("--syscalls needs strace (apt-get install strace)")
    with tempfile.TemporaryDirectory(prefix="rm-strace-") as tmp:
        outputs = [Path(tmp) / f"{i}.txt" for i in range(len(target.counted))]  # type: ignore[attr-defined]
        tracers = [subprocess.Popen([strace, "-c", "-f", "-o", str(out), "-p", str(p.pid)], stderr=subprocess.DEVNULL)
                   for out, p in zip(outputs, target.counted, strict=True)]  # type: ignore[attr-defined]
        time.sleep(1.0)  # attached
        gen.topic = target.topic  # type: ignore[attr-defined]
        run_burst(target, gen, f"strace {label}", args.requests, args.qos)  # type: ignore[arg-type]
        for tracer in tracers:
            tracer.send_signal(2)
            tracer.wait(30)
        for i, out in enumerate(outputs):
            calls = {}
            for line in out.read_text().splitlines():
                cols = line.split()
                if len(cols) >= 5 and cols[3].isdigit() and cols[-1].isidentifier() and cols[-1] != "total":
                    calls[cols[-1]] = int(cols[3])
            total = sum(calls.values()) / args.requests
            top = ", ".join(f"{name} {n / args.requests:.2f}" for name, n in sorted(calls.items(), key=lambda c: -c[1])[:6])
            print(f"{label}, node {i + 1} of {len(outputs)}: {total:.2f} system calls per flow ({top})", flush=True)


def profile(nodes: dict[str, psutil.Process], target: object, gen: LoadGenerator, args: argparse.Namespace,
            forwarding: str) -> None:
    """py-spy on the forwarding node (`via-rest` or `via-mqtt`) and the peer during three bursts."""
    from profile import OUT, print_shares, record, shares

    OUT.mkdir(exist_ok=True)
    spies = {name: record(["--pid", str(nodes[key].pid)], OUT / f"forward_{forwarding}_{name}.txt", "raw")
             for name, key in (("forwarding", forwarding), ("peer", "home"))}
    time.sleep(1.0)
    gen.topic = target.topic  # type: ignore[attr-defined]
    for i in range(3):
        run_burst(target, gen, f"profiled {forwarding} {i}", args.requests, args.qos)  # type: ignore[arg-type]
    for spy in spies.values():
        spy.send_signal(2)
        spy.wait(30)
    for name in spies:
        print_shares(f"{name} node, {forwarding}", shares(OUT / f"forward_{forwarding}_{name}.txt", top=30))


if __name__ == "__main__":
    main()
