"""Benchmark: MQTT requests of a 3-step POST flow (with its load-balancer GET)
through a real Mosquitto and rm_mqtt, against a tight sequential keep-alive HTTP
client making the same calls with no runtime manager and no MQTT.

    make bench            # or: .venv/bin/python bench/bench.py [--quick]
    .venv/bin/python bench/bench.py --skip-wasm --compare-with ../before
                          # ../before: another checkout (git worktree add ../before <commit>);
                          # both trees' rm_mqtt run in the same rounds, each against the tight client
                          # (REST too, the order flipped each round); a last table gives each
                          # scenario's CPU ratio round by round, the measure to trust on a noisy machine

Every process runs on this machine: broker, fake component service, rm_mqtt and
this load generator share its cores. Figures are ratios measured in one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime_manager.mqtt.link import set_nodelay  # noqa: E402

FLOW = "1\nTO component1 1\nPOST payload\nTO component2 1\nPOST result1\nTO component3 1\nPOST result1 result2\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Setup:
    """Broker, fake service and rm_mqtt, each a process of its own."""

    def __init__(
        self, workdir: Path, extra_components: dict | None = None, flows: str = FLOW, processes: int = 1,
        root: Path = ROOT, label: str = "this tree", stock_broker: bool = False,
        command: tuple[str, ...] = ("-m", "runtime_manager.rm_mqtt"),
    ) -> None:
        self.command = command
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.root, self.label = workdir, root, label
        self.procs: list[subprocess.Popen] = []
        self.broker_port, self.service_port = free_port(), free_port()
        conf = (ROOT / "config_files" / "mosquitto.conf").read_text().replace("listener 1883", f"listener {self.broker_port}")
        if stock_broker:  # as users have it: Mosquitto's default, Nagle's algorithm on
            conf = "\n".join(line for line in conf.splitlines() if not line.startswith("set_tcp_nodelay"))
        if os.geteuid() == 0:
            conf += "user root\n"
        (workdir / "mosquitto.conf").write_text(conf)
        cfg = workdir / "cfg"
        cfg.mkdir()
        source = ROOT / "test" / "fractal_original"  # flow 1 of the original, its components and load balancer
        for name in ("components.conf", "load_balancer.conf"):
            (cfg / name).write_bytes((source / name).read_bytes().replace(b"6000", str(self.service_port).encode()))
        if extra_components:
            comps = json.loads((cfg / "components.conf").read_text())
            comps.update(extra_components)
            (cfg / "components.conf").write_text(json.dumps(comps))
        (cfg / "flows.conf").write_text(flows)
        (cfg / "runtime.conf").write_text(json.dumps({"node_id": "1", "heartbeat_interval_ms": 0, "queue_depth": 8192}))
        self.cfgs = []
        for i in range(processes):
            # several processes of one node share the requests through an MQTT 5 shared subscription
            mqtt_cfg = {"topic": "bench", "host": "127.0.0.1", "port": self.broker_port, "keepalive": 60, "qos": 1,
                        "client_id": f"bench-rm-{os.getpid()}-{i}"}
            if processes > 1:
                mqtt_cfg["shared_group"] = "bench"
            (cfg / "comm.conf").write_text(json.dumps({
                "mqtt": mqtt_cfg, "rest": {"endpoint": "/startrm", "port": free_port()}, "log": {"level": "WARNING"}}))
            copy = workdir / f"cfg{i}"
            shutil.copytree(cfg, copy)
            if i:  # a node id of its own: one id runs in one process (a second would not start)
                (copy / "runtime.conf").write_text(json.dumps({"node_id": str(i + 1), "heartbeat_interval_ms": 0,
                                                               "queue_depth": 8192}))
            self.cfgs.append(copy)
        self.cfg = self.cfgs[0]

    def start(self) -> Setup:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = open(self.workdir / "procs.log", "ab")
        self.procs.append(subprocess.Popen([exe, "-c", str(self.workdir / "mosquitto.conf")], stdout=log, stderr=log))
        self.procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "fast_service.py"), "--port", str(self.service_port)],
                                           stdout=log, stderr=log))
        wait_port(self.broker_port)
        wait_port(self.service_port)
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        self.rms = [subprocess.Popen([sys.executable, *self.command, "--config-dir", str(c)],
                                     stdout=log, stderr=log, cwd=self.root, env=env) for c in self.cfgs]
        self.procs.extend(self.rms)
        self.rm_ps = [psutil.Process(p.pid) for p in self.rms]
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    def peak_rss_mb(self) -> float:
        """The largest peak resident set of the node processes (workers included)."""
        peaks = []
        for p in [q for ps in self.rm_ps for q in [ps, *ps.children(recursive=True)]]:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return max(peaks)

    def cpu_s(self) -> float:
        """CPU time of the node processes (and of their workers, under `serve --processes`)."""
        total = 0.0
        for p in self.rm_ps:
            for proc in [p, *p.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        return total


class LoadGenerator:
    """Publishes requests, collects results, times each one."""

    def __init__(self, port: int) -> None:
        self.sent: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.statuses: dict[str, str] = {}
        self.node_ms: dict[str, float] = {}  # the node's own time: request taken -> result made (`elapsed_ms`)
        self.cond = threading.Condition()
        self.sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}", protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.topic = "bench"  # where requests go (results are taken from every `<topic>/result`)
        self.sub.on_connect = lambda c, *a: (set_nodelay(c), c.subscribe("+/result", qos=1))
        self.sub.on_subscribe = lambda *a: ready.set()
        self.sub.on_message = self._on_result
        self.sub.connect("127.0.0.1", port)
        self.sub.loop_start()
        assert ready.wait(10)
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=mqtt.MQTTv5)
        self.pub.max_inflight_messages_set(65535)
        self.pub.max_queued_messages_set(0)
        self.pub.on_connect = lambda c, *a: set_nodelay(c)
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()

    def _on_result(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        data = orjson.loads(msg.payload)
        rid = data.get("request_id")
        with self.cond:
            if rid not in self.done:
                self.done[rid] = now
                self.statuses[rid] = data.get("status")
                if isinstance(data.get("elapsed_ms"), (int, float)):
                    self.node_ms[rid] = data["elapsed_ms"]

    def send(self, rid: str, qos: int) -> None:
        self.sent[rid] = time.perf_counter()
        self.pub.publish(self.topic, orjson.dumps({"id_flow": "1", "payload": "0x03abcdefghil", "request_id": rid}),
                         qos=qos)

    def wait(self, rids: list[str], timeout: float) -> None:
        wait_for_results(self, rids, timeout)

    def close(self) -> None:
        for c in (self.pub, self.sub):
            c.disconnect()
            c.loop_stop()


def wait_for_results(gen: Any, rids: list[str], timeout: float) -> None:
    """Until every one of `rids` has its result (or `timeout`), looking every
    5 ms at those still missing. (Waking at each result to look at all of them
    again cost the load generator O(n²) and, with it, about as much CPU as the
    node it measures: on two cores, a node slowed by its own benchmark.)"""
    deadline = time.monotonic() + timeout
    missing = list(rids)
    while missing and time.monotonic() < deadline:
        time.sleep(0.005)
        with gen.cond:
            missing = [r for r in missing if r not in gen.done]


def run_burst(setup: Setup, gen: LoadGenerator, name: str, n: int, qos: int) -> dict[str, Any]:
    rids = [f"{name}-{i}" for i in range(n)]
    cpu0 = setup.cpu_s()
    t0 = time.perf_counter()
    for rid in rids:
        gen.send(rid, qos)
    gen.wait(rids, timeout=120)
    got = [r for r in rids if r in gen.done]
    t1 = max(gen.done[r] for r in got) if got else time.perf_counter()
    cpu = setup.cpu_s() - cpu0
    return summarize(name, rids, gen, t1 - t0, cpu)


def run_paced(setup: Setup, gen: LoadGenerator, name: str, rate: float, seconds: float, qos: int) -> dict[str, Any]:
    n = int(rate * seconds)
    rids = [f"{name}-{i}" for i in range(n)]
    cpu0 = setup.cpu_s()
    t0 = time.perf_counter()
    for i, rid in enumerate(rids):
        target = t0 + i / rate
        while (delay := target - time.perf_counter()) > 0:
            time.sleep(min(delay, 0.002))
        gen.send(rid, qos)
    gen.wait(rids, timeout=60)
    cpu = setup.cpu_s() - cpu0
    return summarize(name, rids, gen, time.perf_counter() - t0, cpu)


def summarize(name: str, rids: list[str], gen: LoadGenerator, elapsed: float, cpu: float) -> dict[str, Any]:
    got = [r for r in rids if r in gen.done]
    lat = sorted((gen.done[r] - gen.sent[r]) * 1000 for r in got)
    ok = sum(1 for r in got if gen.statuses[r] == "ok")
    # the node's own share: from the request taken (parsed) to its result made
    node = sorted(gen.node_ms[r] for r in got if r in gen.node_ms)
    slowest = sorted(got, key=lambda r: gen.done[r] - gen.sent[r])[-max(1, len(got) // 100):]
    slow_node = [gen.node_ms[r] for r in slowest if r in gen.node_ms]
    return {
        "node_p50_ms": statistics.median(node) if node else float("nan"),
        "node_p99_ms": node[min(len(node) - 1, int(len(node) * 0.99))] if node else float("nan"),
        "slowest_1pct_node_ms": statistics.median(slow_node) if slow_node else float("nan"),
        "slowest_1pct_ms": statistics.median((gen.done[r] - gen.sent[r]) * 1000 for r in slowest) if slowest else float("nan"),
        "scenario": name, "requests": len(rids), "ok": ok, "errors": len(got) - ok, "lost": len(rids) - len(got),
        "flows_per_s": ok / elapsed if elapsed else 0.0,
        "p50_ms": statistics.median(lat) if lat else float("nan"),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        "cpu_us_per_flow": cpu / max(1, len(got)) * 1e6,
    }


def run_rest(setup: Setup, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` concurrent keep-alive HTTP clients posting flow 1 to an rm_api of
    the same config, as fast as answers come back."""
    import json as _json

    cfg = setup.cfgs[0]
    port = _json.loads((cfg / "comm.conf").read_text())["rest"]["port"]
    log = open(setup.workdir / "rest.log", "ab")
    env = {**os.environ, "PYTHONPATH": str(setup.root)}
    api = subprocess.Popen([sys.executable, "-m", "runtime_manager.rm_api", "--config-dir", str(cfg)],
                           stdout=log, stderr=log, cwd=setup.root, env=env)
    try:
        wait_port(port)
        proc = psutil.Process(api.pid)
        body = orjson.dumps({"id_flow": "1", "is_load_balancing": False, "payload": "0x03abcdefghil"})
        for _ in range(2):  # warm-up: connections and caches
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("POST", "/startrm", body=body, headers={"Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.perf_counter()
        latencies, errors = rest_clients(port, body, clients, seconds)
        elapsed = time.perf_counter() - t0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        lat = sorted(latencies)
        return {"scenario": f"REST, {clients} keep-alive clients for {seconds:g} s", "requests": len(lat) + errors,
                "ok": len(lat), "errors": errors, "lost": 0, "flows_per_s": len(lat) / elapsed,
                "p50_ms": statistics.median(lat) if lat else float("nan"),
                "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
                "cpu_us_per_flow": cpu / max(1, len(lat)) * 1e6}
    finally:
        api.send_signal(signal.SIGTERM)
        try:
            api.wait(20)
        except subprocess.TimeoutExpired:
            api.kill()


def rest_clients(port: int, body: bytes, clients: int, seconds: float) -> tuple[list[float], int]:
    """`clients` keep-alive connections on one asyncio loop (uvloop), each posting
    the next request as soon as the answer came: the latencies (ms) of the good
    answers, and how many were not. One loop, not a thread per client: threads
    of one process wait for each other's GIL (up to 5 ms), which would be
    measured as the node's latency."""
    import asyncio

    request = (b"POST /startrm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    latencies: list[float] = []
    errors = 0

    async def client(stop_at: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                data = await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200") or b'"status":"ok"' not in data:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
        finally:
            writer.close()

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(client(stop_at) for _ in range(clients)))

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return latencies, errors


def tight_client(port: int, seconds: float) -> float:
    """The same calls (LB GET + 3 chained POSTs), one after another, one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json"}

    def call(method: str, path: str, body: bytes | None) -> Any:
        conn.request(method, path, body=body, headers=headers)
        return orjson.loads(conn.getresponse().read())

    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call("GET", "/LB/id_node", None)
        r1 = call("POST", "/endpoint1", orjson.dumps({"payload": ["0x03abcdefghil"]}))
        r2 = call("POST", "/endpoint1", orjson.dumps({"payload": [r1]}))
        call("POST", "/endpoint1", orjson.dumps({"payload": [r1, r2]}))  # the same bodies the flow sends
        n += 1
    elapsed = time.perf_counter() - t0
    conn.close()
    return n / elapsed


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| scenario | requests | ok | lost | flows/s | × tight client | p50 ms | p99 ms | CPU µs/flow |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = "—" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}"  # NaN: not compared
        out.append(f"| {r['scenario']} | {r['requests']} | {r['ok']} | {r['lost']} | {r['flows_per_s']:.0f} | "
                   f"{ratio} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us_per_flow']:.0f} |")
    return "\n".join(out)


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ratio, with the totals of lost requests over all runs."""
    runs = sorted(runs, key=lambda r: r["ratio"])
    row = dict(runs[len(runs) // 2])
    row["lost"] = sum(r["lost"] for r in runs)
    row["scenario"] += f" (median of {len(runs)})" if len(runs) > 1 else ""
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of the benchmark)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of tight client and bursts")
    parser.add_argument("--skip-wasm", action="store_true")
    parser.add_argument("--processes", type=int, default=1, help="rm_mqtt processes sharing the topic (MQTT 5 shared subscription)")
    parser.add_argument("--compare-with", type=Path, help="another checkout of the project, measured in the same rounds")
    parser.add_argument("--stock-broker", action="store_true", help="the broker without set_tcp_nodelay (Mosquitto's default)")
    parser.add_argument("--paced-only", action="store_true", help="only the paced runs (latency)")
    parser.add_argument("--no-stock-paced", action="store_true",
                        help="skip the paced runs against a stock broker (Mosquitto's defaults: no set_tcp_nodelay)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    tight_s = 2 * scale + 0.3
    with tempfile.TemporaryDirectory(prefix="rm-bench-") as tmp:
        setups = [Setup(Path(tmp) / "a", processes=args.processes, stock_broker=args.stock_broker)]
        if args.compare_with:
            root = args.compare_with.resolve()
            setups.append(Setup(Path(tmp) / "b", processes=args.processes, root=root, label=str(root),
                                stock_broker=args.stock_broker))
        gens: list[LoadGenerator] = []
        try:
            for setup in setups:
                setup.start()
                gens.append(LoadGenerator(setup.broker_port))
            time.sleep(1.0)
            for setup, gen in zip(setups, gens, strict=True):
                run_burst(setup, gen, "warmup", int(300 * scale) or 10, 1)
            # The machine is shared and noisy: each burst is compared with the tight
            # client measured just before and just after it, in rounds.
            bursts: dict[str, dict[str, list[dict[str, Any]]]] = {s.label: {} for s in setups}
            tights = [tight_client(setups[0].service_port, tight_s)]
            for rnd in range(0 if args.paced_only else args.rounds):
                for name, n, qos in (("burst 2,000, QoS 0", 2000, 0), ("burst 4,000, QoS 1", 4000, 1)):
                    for setup, gen in zip(setups, gens, strict=True):
                        row = run_burst(setup, gen, f"{name} r{rnd}", int(n * scale), qos)
                        tights.append(tight_client(setup.service_port, tight_s))
                        row["ratio"] = row["flows_per_s"] / ((tights[-1] + tights[-2]) / 2)
                        row["scenario"] = name
                        bursts[setup.label].setdefault(name, []).append(row)
            paced: dict[str, list[dict[str, Any]]] = {s.label: [] for s in setups}
            for qos in (0, 1):
                for setup, gen in zip(setups, gens, strict=True):
                    row = run_paced(setup, gen, f"paced 200/s for 10 s, QoS {qos}", 200, 10 * scale, qos)
                    tights.append(tight_client(setup.service_port, tight_s))
                    row["ratio"] = row["flows_per_s"] / ((tights[-1] + tights[-2]) / 2)
                    paced[setup.label].append(row)
            rss = {s.label: s.peak_rss_mb() for s in setups}
            # REST in rounds as well, the trees' order flipped each round (one ten-second
            # run of each was at the mercy of the machine in those ten seconds)
            rests: dict[str, list[dict[str, Any]]] = {s.label: [] for s in setups}
            for rnd in range(0 if args.paced_only else args.rounds):
                for setup in (setups if rnd % 2 == 0 else setups[::-1]):
                    row = run_rest(setup, 8, 5 * scale)
                    tights.append(tight_client(setup.service_port, tight_s))
                    row["ratio"] = row["flows_per_s"] / ((tights[-1] + tights[-2]) / 2)
                    rests[setup.label].append(row)
            for label, runs in rests.items():
                if runs:
                    paced[label].append(median_row(runs))
            if not args.no_stock_paced and not args.stock_broker:
                # the QoS 0 latency trap: a broker as Mosquitto ships it, this tree only
                stock = Setup(Path(tmp) / "stock", processes=args.processes, stock_broker=True).start()
                stock_gen = LoadGenerator(stock.broker_port)
                try:
                    time.sleep(1.0)
                    run_burst(stock, stock_gen, "warmup-stock", int(300 * scale) or 10, 1)
                    for qos in (0, 1):
                        row = run_paced(stock, stock_gen, f"paced 200/s for 10 s, QoS {qos}, stock broker", 200,
                                        10 * scale, qos)
                        row["ratio"] = float("nan")
                        paced[setups[0].label].append(row)
                finally:
                    stock_gen.close()
                    stock.stop()
        finally:
            for gen in gens:
                gen.close()
            for setup in setups:
                setup.stop()
    print(f"tight sequential keep-alive client: median {statistics.median(tights):.0f} flows/s "
          f"(min {min(tights):.0f}, max {max(tights):.0f}, {len(tights)} runs)")
    for setup in setups:
        rows = [median_row(runs) for runs in bursts[setup.label].values()] + paced[setup.label]
        broker = "stock broker (no set_tcp_nodelay)" if args.stock_broker else "broker with config_files/mosquitto.conf"
        print(f"\n{setup.label}: rm_mqtt processes: {args.processes}; {broker}; peak RSS (largest process): {rss[setup.label]:.1f} MB")
        print(table(rows))
        print("\n| paced scenario | end to end p50 / p99 ms | the node's own time p50 / p99 ms | "
              "slowest 1 %: end to end / the node's own (medians) ms |\n| --- | --- | --- | --- |")
        for r in paced[setup.label]:
            if "node_p50_ms" in r:
                print(f"| {r['scenario']} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['node_p50_ms']:.2f} / "
                      f"{r['node_p99_ms']:.2f} | {r['slowest_1pct_ms']:.2f} / {r['slowest_1pct_node_ms']:.2f} |")
    if len(setups) == 2 and not args.paced_only:
        this, other = (s.label for s in setups)
        print(f"\n| scenario | CPU per flow, {this} ÷ {other}, round by round: median (range) |\n| --- | --- |")
        scenarios = {**{name: (runs, bursts[other][name]) for name, runs in bursts[this].items()},
                     "REST, 8 keep-alive clients": (rests[this], rests[other])}
        for name, (mine, theirs) in scenarios.items():
            ratios = [a["cpu_us_per_flow"] / b["cpu_us_per_flow"] for a, b in zip(mine, theirs, strict=True)]
            print(f"| {name} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"tight": tights, "peak_rss_mb": rss, "bursts": bursts, "paced": paced,
                                                "rest": rests}, indent=2))
    if not args.skip_wasm:  # its own process (it uses this module's setups)
        subprocess.run([sys.executable, str(ROOT / "bench" / "wasm_bench.py"), *(["--quick"] if args.quick else [])],
                       check=True)


if __name__ == "__main__":
    main()
