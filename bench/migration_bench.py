"""Moving modules with their state: what the Asyncify transform costs, and the
pause of a move between two real nodes.

    .venv/bin/python bench/migration_bench.py [--moves 15] [--sizes 1 16 64]

The module is test/wasm/wander.c (a plain C program built with clang and
wasi-libc): it prints a line, sleeps, and keeps a heap "ballast" of the given
MiB of pseudo-random bytes (the worst case for a checkpoint: nothing to
compress). Three parts:

- the transform: wasm-opt's time on a cold cache and a warm one, and the bytes;
- a run's cost, transformed against the original (in this process, plain
  runs): a loop that calls the host each round (print), and one that mostly
  computes (no host call in its inner loop);
- moves: Mosquitto with its defaults on a free port, two `serve` nodes with an
  orchestrator runtime each (module_memory_mb 160), the module moved back and
  forth `--moves` times; the pause each move reports (the module stopped at its
  source to the destination saying it goes on) and the checkpoint's size.

Prints one JSON line per part; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
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
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(tmp: Path) -> Path:
    out = tmp / "wander.wasm"
    clang = shutil.which("clang-14") or shutil.which("clang") or "clang"
    subprocess.run([clang, "--target=wasm32-wasi", "--sysroot=/usr", "-isystem", "/usr/include/wasm32-wasi",
                    "-L/usr/lib/wasm32-wasi", "-O2", str(ROOT / "test" / "wasm" / "wander.c"), "-o", str(out)], check=True)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def transform_cost(module: Path, tmp: Path) -> dict:
    os.environ["RM_WASM_CACHE"] = str(tmp / "cache")
    from runtime_manager.wasm.migratable import prepare, wasm_opt_version

    data = module.read_bytes()
    t0 = time.perf_counter()
    cold = prepare(data)
    t1 = time.perf_counter()
    prepare(data)
    t2 = time.perf_counter()
    assert cold.why_not is None, cold.why_not
    return {"part": "transform", "wasm_opt": wasm_opt_version(), "bytes_before": len(data), "bytes_after": len(cold.data),
            "growth_pct": round((len(cold.data) / len(data) - 1) * 100, 1), "cold_ms": round((t1 - t0) * 1000, 1),
            "cached_ms": round((t2 - t1) * 1000, 2)}


def run_cost(module: Path, rounds: int = 3) -> dict:
    import wasmtime

    from runtime_manager.config import WasmLimits
    from runtime_manager.wasm.migratable import prepare
    from runtime_manager.wasm.modules import make_engine
    from runtime_manager.wasm.resumable import ResumableRun
    from runtime_manager.wasm.sandbox import load, run_module

    prepared = prepare(module.read_bytes())

    def original(argv: list[str]) -> float:
        engine = make_engine(False)
        loaded = load(module, engine=engine)
        t = time.perf_counter()
        outcome = run_module(loaded, "_start", b"", WasmLimits(memory_mb=64), argv=argv, stdout=lambda _b: None,
                             deadline_ticks=1)
        assert outcome.trap is None, outcome.trap
        return time.perf_counter() - t

    def transformed(argv: list[str]) -> float:
        engine = make_engine(False)
        compiled = wasmtime.Module(engine, prepared.data)
        run = ResumableRun(engine, compiled, prepared.sha256, argv=argv, env={}, stdout=lambda _b: None, memory_mb=64,
                           stop=threading.Event())
        t = time.perf_counter()
        outcome = run.run()
        took = time.perf_counter() - t
        run.close()
        assert getattr(outcome, "trap", None) is None
        return took

    out = {"part": "run cost"}
    for name, argv in (("host call each round", ["wander", "3000", "0", "0", "0"]),
                       ("compute, no host call", ["wander", "20", "0", "0", "3000000"])):
        before = statistics.median(original(argv) for _ in range(rounds))
        after = statistics.median(transformed(argv) for _ in range(rounds))
        out[name] = {"original_ms": round(before * 1000, 1), "transformed_ms": round(after * 1000, 1),
                     "ratio": round(after / before, 2)}
    return out


class Realm:
    """Mosquitto (defaults) and two serve nodes with orchestrator runtimes."""

    def __init__(self, tmp: Path, module: Path, broker: str = "stock") -> None:
        self.log = tmp / "procs.log"
        self.broker = broker
        self.tmp, self.port, self.realm = tmp, free_port(), f"bench-{uuid.uuid4().hex[:6]}"
        self.procs: list[subprocess.Popen] = []
        conf = tmp / "mosquitto.conf"
        if broker == "stock":  # Mosquitto's defaults
            text = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        else:  # what the README tells users to set (config_files/mosquitto.conf)
            text = (ROOT / "config_files" / "mosquitto.conf").read_text().replace("listener 1883", f"listener {self.port}")
        conf.write_text(text + ("user root\n" if os.geteuid() == 0 else ""))
        log = open(tmp / "procs.log", "ab")
        self.procs.append(subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                                           stdout=log, stderr=log))
        time.sleep(0.3)
        self.cfgs = []
        for i in (1, 2):
            cfg = tmp / f"cfg{i}"
            shutil.copytree(ROOT / "config_files", cfg, ignore=shutil.ignore_patterns("runtime_state.json"))
            modules = tmp / f"modules{i}"
            modules.mkdir()
            for wat in ("upper.wat", "sum.wat"):  # the flow steps of config_files/
                shutil.copy(ROOT / "runtimes" / wat, modules)
            if i == 1:
                shutil.copy(module, modules / "wander.wasm")
            (cfg / "comm.conf").write_text(json.dumps({
                "mqtt": {"topic": f"{self.realm}-req", "host": "127.0.0.1", "port": self.port, "qos": 1},
                "rest": {"endpoint": "/startrm", "host": "127.0.0.1", "port": free_port()}, "log": {"level": "WARNING"}}))
            (cfg / "runtime.conf").write_text(json.dumps({
                "node_id": f"{self.realm}-{i}", "module_dir": str(modules), "heartbeat_interval_ms": 0,
                "orchestrator": {"realm": self.realm, "name": f"node{i}", "reg_timeout_s": 0.5,
                                 "module_memory_mb": 160}}))
            self.procs.append(subprocess.Popen([sys.executable, "-m", "runtime_manager", "serve", "--config-dir", str(cfg)],
                                               stdout=log, stderr=log, cwd=ROOT))
            self.cfgs.append(cfg)
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, *a: c.subscribe([(f"{self.realm}/rm/#", 1), (f"{self.realm}/proc/#", 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        try:
            self.runtimes = self.wait(lambda: self._runtimes() if len(self._runtimes()) == 2 else None, 30)
        except RuntimeError:
            self.close()  # what started is stopped
            raise RuntimeError("the nodes did not come up:\n" + self.log.read_text()[-3000:]) from None

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def _runtimes(self) -> dict[str, str]:
        found = {}
        for topic, payload in list(self.messages):
            if "/rm/presence/" in topic and payload:
                record = json.loads(payload)
                found[record["name"]] = record["uuid"]
        return found

    def wait(self, fn: object, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = fn()  # type: ignore[operator]
            if value:
                return value
            time.sleep(0.02)
        raise RuntimeError("timed out")

    def control(self, runtime: str, action: str, data: dict, **more: object) -> None:
        body = {"object_id": str(uuid.uuid4()), "action": action, "type": "req", "data": data, **more}
        self.client.publish(f"{self.realm}/proc/control/{runtime}", json.dumps(body), qos=1).wait_for_publish(5)

    def reports(self, module: str) -> list[dict]:
        with self.cond:
            return [json.loads(p) for t, p in self.messages if t == f"{self.realm}/rm/moved/{module}"]

    def lines(self, module: str) -> int:
        with self.cond:
            return sum(p.count(b"\n") for t, p in self.messages if t == f"{self.realm}/proc/stdio/{module}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def pauses(realm: Realm, mib: int, moves: int) -> dict:
    n1, n2 = realm.runtimes["node1"], realm.runtimes["node2"]  # type: ignore[index]
    module = str(uuid.uuid4())
    realm.control(n1, "create", {"type": "module", "uuid": module, "name": f"ballast{mib}", "parent": n1,
                                 "file": "wander.wasm", "args": {"argv": ["100000", "20", str(mib)]}})
    realm.wait(lambda: realm.lines(module) >= 3, 120)
    where = [n1, n2]
    for i in range(moves):
        source, target = where[i % 2], where[(i + 1) % 2]
        realm.control(source, "delete", {"type": "module", "uuid": module}, send_to_runtime=target)
        realm.wait(lambda i=i: len(realm.reports(module)) > i, 60)
        seen = realm.lines(module)
        realm.wait(lambda seen=seen: realm.lines(module) > seen, 30)  # it goes on at the destination
    reports = realm.reports(module)
    realm.control(where[moves % 2], "delete", {"type": "module", "uuid": module})
    ms = [r["pause_ms"] for r in reports if r["with_state"]]
    assert len(ms) == moves, reports
    return {"part": "moves", "broker": realm.broker, "memory_mib": mib, "moves": moves, "pause_ms_p50": round(statistics.median(ms), 1),
            "pause_ms_p99": round(percentile(ms, 0.99), 1), "pause_ms_max": round(max(ms), 1),
            "checkpoint_bytes": int(statistics.median(r["checkpoint_bytes"] for r in reports)),
            "timings_ms_p50": {k: round(statistics.median(r["timings"].get(k, 0) for r in reports), 1)
                               for k in reports[0]["timings"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=15)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--broker", choices=("stock", "readme"), default="stock",
                        help="Mosquitto's defaults, or config_files/mosquitto.conf (what the README tells users to set)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rm-migration-bench-") as name:
        tmp = Path(name)
        module = build(tmp)
        print(json.dumps(transform_cost(module, tmp)), flush=True)
        print(json.dumps(run_cost(module)), flush=True)
        realm = Realm(tmp, module, args.broker)
        try:
            for mib in args.sizes:
                print(json.dumps(pauses(realm, mib, args.moves)), flush=True)
        finally:
            realm.close()


if __name__ == "__main__":
    main()
