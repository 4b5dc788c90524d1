"""Fixtures: a real Mosquitto on a free port, fake services on free ports, the
entry points under test as real processes. Everything started is stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL = ROOT / "test" / "fractal_original"  # the original's config files, as they are
SHIPPED = ROOT / "config_files"
sys.path.insert(0, str(ROOT / "test"))
sys.path.insert(0, str(ROOT))

from helpers import MqttProbe, free_port, wait_for  # noqa: E402
from mock_services import MockServices  # noqa: E402


class Broker:
    """A real Mosquitto, with the shipped settings, on a free port of 127.0.0.1."""

    def __init__(self, workdir: Path, extra: str = "") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        conf = (SHIPPED / "mosquitto.conf").read_text().replace("listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1")
        conf += f"\npersistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
        if os.geteuid() == 0:
            conf += "user root\n"
        conf += extra
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(conf)

    def start(self) -> Broker:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: _port_open(self.port), 10, "mosquitto to listen")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_config(
    dest: Path,
    mock_port: int,
    broker_port: int = 1,
    rest_port: int | None = None,
    topic: str = "component_msg",
    runtime: dict | None = None,
    flows: str | None = None,
    components: dict | None = None,
    comm: dict | None = None,
    lb: dict | None = None,
    nodes: dict | None = None,
) -> Path:
    """A config directory: the original FRACTAL files, pointed at our ports."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ORIGINAL.glob("*.conf"):
        (dest / f.name).write_bytes(f.read_bytes().replace(b"6000", str(mock_port).encode()))
    comm_data = json.loads((dest / "comm.conf").read_text())
    # a client id of its own per config: two nodes with one id would keep taking each other's session
    comm_data["mqtt"].update(port=broker_port, topic=topic, client_id=f"rm-test-{dest.name}-{uuid.uuid4().hex[:8]}")
    comm_data["rest"]["port"] = rest_port or free_port()
    for section, values in (comm or {}).items():
        comm_data.setdefault(section, {}).update(values)
    (dest / "comm.conf").write_text(json.dumps(comm_data, indent=2))
    (dest / "runtime.conf").write_text(json.dumps({"heartbeat_interval_ms": 0, **(runtime or {})}))
    if flows is not None:
        (dest / "flows.conf").write_text(flows)
    if components is not None:
        data = json.loads((dest / "components.conf").read_text())
        data.update(components)
        (dest / "components.conf").write_text(json.dumps(data, indent=2))
    if lb is not None:
        (dest / "load_balancer.conf").write_text(json.dumps(lb))
    if nodes is not None:
        (dest / "nodes.conf").write_text(json.dumps(nodes))
    return dest


class RmProcess:
    """A node as a real process: `serve`, or an entry point (`rm_mqtt`, `rm_api`)."""

    def __init__(self, module: str, config_dir: Path, *extra: str, script: bool = False, env: dict | None = None) -> None:
        self.module, self.config_dir = module, config_dir
        self.env = {**os.environ, **env} if env else None
        self.logfile = config_dir / f"{module}.log"
        if module == "serve":
            cmd = [sys.executable, "-m", "runtime_manager", "serve"]
        elif script:
            cmd = [sys.executable, str(ROOT / "runtime_manager" / f"{module}.py")]
        else:
            cmd = [sys.executable, "-m", f"runtime_manager.{module}"]
        self.cmd = [*cmd, "--config-dir", str(config_dir), *extra]
        self.proc: subprocess.Popen | None = None

    def start(self, ready: str | None = "engine started") -> RmProcess:
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        if ready:
            wait_for(lambda: ready in self.log() or self.proc.poll() is not None, 20, f"{self.module} to start")
            assert self.proc.poll() is None, self.log()
        if ready == "engine started" and self.module in ("serve", "rm_mqtt"):
            # the engine starts before the MQTT link has connected: a request sent in
            # between would find no subscriber; wait (bounded, not required: some
            # tests start a node whose broker is down)
            deadline = time.monotonic() + 5
            while "connected (session present" not in self.log() and time.monotonic() < deadline:
                time.sleep(0.02)
        return self

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        rc = self.proc.returncode
        self.proc = None
        return rc

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def mock() -> Iterator[MockServices]:
    m = MockServices().start()
    yield m
    m.stop()


@pytest.fixture
def processes() -> Iterator[list[RmProcess]]:
    started: list[RmProcess] = []
    yield started
    broken = []
    for p in started:
        p.stop(signal.SIGKILL)
        if "--- Logging error ---" in p.log():
            broken.append(p.logfile)
    if broken:
        pytest.fail(f"a log call failed in {broken}")


@pytest.fixture
def probe_factory(broker: Broker) -> Iterator:
    probes: list[MqttProbe] = []

    def make(port: int | None = None, topics: tuple[str, ...] = ("component_msg/result",)) -> MqttProbe:
        p = MqttProbe(port or broker.port, topics)
        probes.append(p)
        return p

    yield make
    for p in probes:
        p.close()
