"""A realm of N nodes on one broker: what membership costs, and how fast a group sees a death and a load change.

    .venv/bin/python bench/realm_sim.py --nodes 1000 [--group-size 50] [--real 2] [--window 30]
                                        [--broker stock|readme] [--before ../before]

One Mosquitto (its defaults, or the README's settings), N simulated nodes and
`--real` real `serve` nodes. The simulated nodes live in this process (asyncio)
and speak the membership protocol on the wire as a node does: each has its own
MQTT connection (so the broker fans out, keeps wills and keepalives, exactly as
for real nodes), its last will, its whole status retained at every heartbeat,
a small load report when its load moves past the threshold, its group's
statuses subscribed to (and read, then dropped). The real nodes are in group
`g0` with `--group-size - --real` simulated members, and find them on their own
(`discover`). `--before DIR` runs the protocol of the tree in DIR (a
`git worktree` of an older commit): every node's whole status every second,
everyone hearing everyone.

Measured, printed as one JSON line:
- `broker_deliveries_per_s`: PUBLISH packets the broker sent per second, from its
  `$SYS/broker/publish/messages/sent` counter (published every 10 s by default;
  the window spans its first and last reading), and `broker_cpu_pct` (of one core,
  from /proc) over the same window: membership is all the broker does here.
- `node_membership_cpu_pct`: a real node's CPU over the window; it serves no
  requests then, so all it does is membership (an upper bound).
- `death_seen_s`: a real node's placement (`GET /lb/id_node`, least_loaded, asked
  every 10 ms) picks a simulated member of its group; that member's connection is
  cut (a killed process: the broker sends its will): how long until the real
  node stops picking it. `stopped_seen_s`: the same for a member that stops
  sending anything with its socket open (SIGSTOP, a host gone): its keepalive runs out.
- `load_seen_s`: a picked member's load goes up (it reports at its next look, as a
  node does): how long until placement picks another.
The real node under test holds one slow request of its own (workers: 1) so that
its home load is 1 and an idle member is picked over it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import requests

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "rm/nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want) if os.geteuid() == 0 else hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ----- MQTT 3.1.1 on the wire: the few packets a member sends ------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, keepalive: int, will_topic: str, will: bytes) -> bytes:
    flags = 0x02 | 0x04 | 0x08 | 0x20  # clean session, a will, QoS 1, retained
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _str(client_id) + _str(will_topic) + _str(will)
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(topic: str) -> bytes:
    body = struct.pack("!H", 1) + _str(topic) + b"\x00"
    return b"\x82" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, retain: bool) -> bytes:
    body = _str(topic) + payload
    return bytes([0x30 | (1 if retain else 0)]) + _varint(len(body)) + body


PINGREQ = b"\xc0\x00"


class Drain(asyncio.Protocol):
    """A member's connection: what the broker sends is read and dropped (a member
    needs nothing of its group's traffic for this; reading it is what costs)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


# ----- a simulated member ------------------------------------------------------------------------
class Member:
    def __init__(self, node_id: str, group: str, args: argparse.Namespace, rest_port: int) -> None:
        self.id, self.group, self.args = node_id, group, args
        before = args.before is not None
        self.topic = f"{PREFIX}/{node_id}" if before or not group else f"{PREFIX}/group/{group}/{node_id}"
        self.listen = f"{PREFIX}/+" if before else f"{PREFIX}/group/{group}/+"
        self.interval = 1.0
        self.heartbeat = 1.0 if before else args.heartbeat_s
        self.keepalive = 60 if before else args.keepalive_s
        self.load = 2.0 if group == "g0" else random.choice((0.0, 0.25, 0.5))
        self.reported = self.load
        self.proto: Drain | None = None
        self.stopped = False
        self.started = time.time()
        self.last_full = 0.0
        self.last_out = 0.0
        self.rest = {"protocol": "http", "ip": "127.0.0.1", "port": rest_port, "endpoint": f"sim/{node_id}"}
        self.sent = 0

    def status(self) -> bytes:
        return json.dumps({
            "node": self.id, "state": "online", "time": round(time.time(), 3), "interval_ms": int(self.heartbeat * 1000),
            "version": "sim", "pid": 1, "instance": {"host": "sim", "pid": 1}, "cpu_percent": 1.0, "rss_mb": 40.0,
            **({"group": self.group} if self.group and self.args.before is None else {}),
            "in_flight": int(self.load * 4), "queued": 0, "capacity": 4, "queue_depth": 400, "processes": 1,
            "load": self.load, "flows": ["1", "2", "3"], "config_dir": "/sim",
            "uptime_s": round(time.time() - self.started, 1), "ready": True, "rest": self.rest}).encode()

    def _send(self, data: bytes) -> None:
        if self.proto is not None and self.proto.transport is not None and not self.proto.transport.is_closing():
            self.proto.transport.write(data)
            self.last_out = time.monotonic()
            self.sent += 1

    async def connect(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        _t, self.proto = await loop.create_connection(Drain, "127.0.0.1", port)
        will = json.dumps({"node": self.id, "state": "offline", "reason": "vanished (its last will)",
                           "interval_ms": int(self.heartbeat * 1000)}).encode()
        self._send(connect_packet(f"sim-{self.id}", self.keepalive, self.topic, will))
        self._send(subscribe_packet(self.listen))
        self.full()

    def full(self) -> None:
        self._send(publish_packet(self.topic, self.status(), retain=True))
        self.last_full = time.monotonic()
        self.reported = self.load

    def report(self) -> None:
        body = json.dumps({"node": self.id, "state": "online", "report": "load", "time": round(time.time(), 3),
                           "in_flight": int(self.load * 4), "queued": 0, "capacity": 4, "load": self.load}).encode()
        self._send(publish_packet(self.topic, body, retain=False))
        self.reported = self.load

    def look(self) -> None:
        """What a node does every status interval."""
        now = time.monotonic()
        if self.args.before is not None or now - self.last_full >= self.heartbeat - 0.001:
            self.full()
        elif abs(self.load - self.reported) >= 0.25 - 1e-9 or (self.load == 0) != (self.reported == 0):
            self.report()
        if now - self.last_out >= self.keepalive * 0.9:
            self._send(PINGREQ)

    async def life(self) -> None:
        await asyncio.sleep(random.random() * self.interval)
        churn = self.interval / self.args.churn_s if self.group != "g0" else 0.0
        while self.proto is not None:
            await asyncio.sleep(self.interval)
            if self.stopped:
                continue
            if random.random() < churn:
                self.load = random.choice((0.0, 0.25, 0.5, 0.75, 1.0, 1.5))
            self.look()

    def kill(self) -> None:
        """A killed process: the socket goes, no DISCONNECT (the broker sends the will)."""
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.abort()
        self.proto = None


# ----- the run -----------------------------------------------------------------------------------
class Realm:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.log = open(tmp / "procs.log", "ab")
        self.closing = False

    def start_broker(self) -> subprocess.Popen:
        conf = self.tmp / "mosquitto.conf"
        if self.args.broker == "stock":
            text = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        else:
            text = (ROOT / "config_files" / "mosquitto.conf").read_text().replace("listener 1883", f"listener {self.port}")
        conf.write_text(text + ("user root\n" if os.geteuid() == 0 else ""))
        proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                                stdout=self.log, stderr=self.log, preexec_fn=raise_nofile)
        self.procs.append(proc)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return proc
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the broker did not start")

    def start_real(self, i: int, hold_port: int, ports: list[int]) -> tuple[subprocess.Popen, int]:
        cfg = self.tmp / f"real{i}"
        shutil.copytree(ROOT / "config_files", cfg, ignore=shutil.ignore_patterns("runtime_state.json", "mosquitto.conf"))
        port = ports[i]
        (cfg / "comm.conf").write_text(json.dumps({
            "mqtt": {"topic": "realm-sim", "host": "127.0.0.1", "port": self.port, "qos": 1},
            "rest": {"endpoint": "/startrm", "host": "127.0.0.1", "port": port}, "log": {"level": "WARNING"}}))
        runtime: dict[str, Any] = {"node_id": f"r{i}", "workers": 1, "queue_depth": 10, "discover": True, "heartbeat_interval_ms": 0,
                                   "task_timeout_ms": 3_600_000}
        if self.args.before is None:
            runtime["group"] = "g0"
        (cfg / "runtime.conf").write_text(json.dumps(runtime))
        (cfg / "nodes.conf").write_text(json.dumps({
            f"r{k}": {"id": f"r{k}", "config": {"protocol": "http", "ip": "127.0.0.1", "port": p, "endpoint": "startrm"}}
            for k, p in enumerate(ports)}))
        (cfg / "load_balancer.conf").write_text(json.dumps({"policy": "least_loaded"}))
        (cfg / "components.conf").write_text(json.dumps({"hold": {"id": 1, "config": {
            "protocol": "http", "ip": "127.0.0.1", "port": hold_port, "endpoints": {"1": "hold"}, "timeout_s": 3600}}}))
        (cfg / "flows.conf").write_text("hold\nTO hold 1\nGET\n")
        tree = Path(self.args.before) if self.args.before else ROOT
        proc = subprocess.Popen([sys.executable, "-m", "runtime_manager", "serve", "--config-dir", str(cfg)],
                                stdout=self.log, stderr=self.log, cwd=tree)
        self.procs.append(proc)
        return proc, port

    def close(self) -> None:
        self.closing = True
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.log.close()


class SysCounter:
    """The broker's $SYS counter of PUBLISH packets sent, with the CPU of the
    processes we watch snapshotted at each reading."""

    def __init__(self, port: int, pids: dict[str, int]) -> None:
        self.pids = pids
        self.readings: list[tuple[float, int, dict[str, float]]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-sys-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, *a: c.subscribe("$SYS/broker/publish/messages/sent")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        cpus = {name: cpu_s(pid) for name, pid in self.pids.items()}
        with self.lock:
            self.readings.append((now, int(msg.payload), cpus))

    def window(self, after: float) -> tuple[float, float, dict[str, float]] | None:
        """(seconds, deliveries/s, CPU % of one core per process) between the first
        reading after `after` and the last one."""
        with self.lock:
            rs = [r for r in self.readings if r[0] >= after]
        if len(rs) < 2:
            return None
        (t0, n0, c0), (t1, n1, c1) = rs[0], rs[-1]
        dt = t1 - t0
        return dt, (n1 - n0) / dt, {k: round(100 * (c1[k] - c0[k]) / dt, 2) for k in c0}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Silent(asyncio.Protocol):
    """A component that never answers: the real nodes' one request in flight each."""


async def hold_server(port: int) -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", port)


def _healthy(port: int) -> int | None:
    """How many peers a real node sees healthy now."""
    try:
        peers = requests.get(f"http://127.0.0.1:{port}/status", timeout=10).json()["placement"]["peers"]
    except (requests.RequestException, ValueError, KeyError):
        return None
    return sum(1 for p in peers if p["state"] == "healthy")


def picked(port: int) -> str:
    answer = requests.get(f"http://127.0.0.1:{port}/lb/id_node", timeout=5).json()
    return str(answer["id_node"])


async def wait_until(fn: Any, timeout: float, step: float = 0.01) -> float | None:
    """Seconds until `fn()` (run off the loop) is true; None when it never is."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await asyncio.to_thread(fn):
            return round(time.monotonic() - t0, 3)
        await asyncio.sleep(step)
    return None


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    raise_nofile()
    realm = Realm(args, tmp)
    members: list[Member] = []
    tasks: list[asyncio.Task] = []
    sys_counter: SysCounter | None = None
    hold_port = free_port()
    server = await hold_server(hold_port)
    try:
        broker = realm.start_broker()
        g = max(args.group_size, args.real + 3)
        real_ports = [free_port() for _ in range(args.real)]
        n_sim = args.nodes - args.real
        for k in range(n_sim):
            in_g0 = k < g - args.real
            group = "g0" if in_g0 else f"g{1 + (k - (g - args.real)) // g}"
            members.append(Member(f"s{k}", group, args, hold_port))
        t0 = time.monotonic()
        for i in range(0, len(members), 200):  # connect in batches: the broker's listen backlog
            batch = members[i:i + 200]
            await asyncio.gather(*(m.connect(realm.port) for m in batch))
            tasks += [asyncio.create_task(m.life()) for m in batch]  # at once: their keepalive runs from now
            await asyncio.sleep(0.05)
        print(f"{len(members)} simulated members connected in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        reals = [realm.start_real(i, hold_port, real_ports) for i in range(args.real)]
        r0_port = reals[0][1]

        def group_seen() -> bool:
            try:
                peers = requests.get(f"http://127.0.0.1:{r0_port}/status", timeout=5).json()["placement"]["peers"]
            except (requests.RequestException, ValueError, KeyError):
                return False
            return sum(1 for p in peers if p["state"] == "healthy") >= 0.9 * min(g - 1, 255)

        seen = await wait_until(group_seen, 120, 0.2)
        if seen is None:
            print("the real node did not see 90 % of its group healthy within 120 s: the cost is measured anyway",
                  file=sys.stderr)
        # each real node's one request in flight (home load 1 with one worker); run at home
        def hold(port: int) -> None:
            try:
                answer = requests.post(f"http://127.0.0.1:{port}/startrm", timeout=3600,
                                       json={"id_flow": "hold", "payload": [], "is_load_balancing": True}).text
            except requests.RequestException as exc:  # the end of the run
                answer = str(exc)
            if not realm.closing:
                print(f"the held request ended early: {answer[:300]}", file=sys.stderr)

        # (the older trees counted the /lb/id_node question as a request of the node's
        # own, one less than what runs: two held requests read as a load of 1 there)
        for _proc, port in reals * (2 if args.before else 1):
            threading.Thread(target=hold, args=(port,), daemon=True).start()
        await asyncio.sleep(1.0)

        # membership's cost, idle: the broker, the real nodes
        pids = {"broker": broker.pid, **{f"real{i}": p.pid for i, (p, _) in enumerate(reals)}, "sim": os.getpid()}
        sys_counter = SysCounter(realm.port, pids)
        start = time.monotonic()
        cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
        await asyncio.sleep(args.window + 11)  # $SYS comes every 10 s: the window spans two readings at least
        window = sys_counter.window(start)
        elapsed = time.monotonic() - start
        cpu_pct = {name: round(100 * (cpu_s(pid) - cpu0[name]) / elapsed, 2) for name, pid in pids.items()}

        g0 = [m for m in members if m.group == "g0"]
        out: dict[str, Any] = {"nodes": args.nodes, "group_size": g, "groups": 1 if args.before else 1 + (n_sim - len(g0) + g - 1) // g,
                               "protocol": "before" if args.before else "after", "broker": args.broker}
        # CPU over the whole window (from /proc); deliveries between the broker's $SYS readings in it
        out.update({"window_s": round(elapsed, 1), "broker_deliveries_per_s": None,
                    "broker_cpu_pct": cpu_pct["broker"],
                    "node_membership_cpu_pct": max(cpu_pct[k] for k in cpu_pct if k.startswith("real")),
                    "simulator_cpu_pct": cpu_pct["sim"]})
        if window is not None:
            out["broker_deliveries_per_s"] = round(window[1])

        out["members_disconnected"] = sum(1 for m in members if m.proto is not None and m.proto.lost)
        out["group_seen_s"] = seen
        out["real_node_saw"] = _healthy(r0_port)
        if seen is None:
            return out

        async def pick(member: Member) -> bool:
            member.load = 0.0
            member.look()  # it reports at once (its next look, here now)
            ok = await wait_until(lambda: picked(r0_port) == member.id, 10) is not None
            if not ok:
                answer = requests.get(f"http://127.0.0.1:{r0_port}/lb/id_node", timeout=5).json()
                print(f"{member.id} not picked: {answer}", file=sys.stderr)
            return ok

        # a death: a picked member's process killed
        victim = g0[0]
        if await pick(victim):
            victim.kill()
            out["death_seen_s"] = await wait_until(lambda: picked(r0_port) != victim.id, 60)
        # a stop: a picked member sends nothing more, its socket open
        stopped = g0[1]
        if await pick(stopped):
            stopped.stopped = True
            out["stopped_seen_s"] = await wait_until(lambda: picked(r0_port) != stopped.id, 90)
        # a load change: a picked member gets busy; it reports at its next look, as a node does
        busy = g0[2]
        if await pick(busy):
            busy.load = 3.0  # its own next look (within a second) reports it
            out["load_seen_s"] = await wait_until(lambda: picked(r0_port) != busy.id, 30)
        return out
    finally:
        for task in tasks:
            task.cancel()
        for m in members:
            m.kill()
        if sys_counter is not None:
            sys_counter.close()
        server.close()
        realm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000, help="nodes in the realm, the real ones included")
    parser.add_argument("--group-size", type=int, default=50)
    parser.add_argument("--real", type=int, default=2, help="real serve nodes (in group g0)")
    parser.add_argument("--window", type=float, default=30, help="seconds over which the cost is measured")
    parser.add_argument("--churn-s", type=float, default=10.0, help="a member's load changes about this often")
    parser.add_argument("--heartbeat-s", type=float, default=5.0, help="status_heartbeat_ms / 1000 (the default)")
    parser.add_argument("--keepalive-s", type=int, default=2, help="presence_keepalive_s (the default)")
    parser.add_argument("--broker", choices=("stock", "readme"), default="stock")
    parser.add_argument("--before", help="a tree of an older commit: its nodes, its protocol (one group)")
    args = parser.parse_args()
    if args.before:
        args.group_size = args.nodes
    with tempfile.TemporaryDirectory(prefix="rm-realm-") as tmp:
        print(json.dumps(asyncio.run(run(args, Path(tmp)))))


if __name__ == "__main__":
    main()
