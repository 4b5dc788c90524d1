"""A fleet across hosts: a real OpenSSH server on three loopback addresses
(127.0.0.2-4, one `sshd` with generated host and user keys), a real Mosquitto,
and `fleet` driving nodes on those "hosts" from one YAML file."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from conftest import ROOT, write_config
from helpers import MqttProbe, wait_for

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _port_free_on(addresses: list[str]) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            for a in addresses[1:]:
                with socket.socket() as s:
                    s.bind((a, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every address")


class Sshd:
    """One sshd listening on three loopback addresses: three hosts."""

    def __init__(self, tmp: Path) -> None:
        assert os.path.exists(SSHD), "sshd is missing: make test installs openssh-server"
        self.dir = tmp
        self.port = _port_free_on(HOSTS)
        for name in ("host_key", "user_key", "stranger_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
        (tmp / "authorized_keys").write_text((tmp / "user_key.pub").read_text())
        os.chmod(tmp / "authorized_keys", 0o600)
        host_pub = (tmp / "host_key.pub").read_text().split()[:2]
        (tmp / "known_hosts").write_text("".join(f"[{h}]:{self.port} {' '.join(host_pub)}\n" for h in HOSTS))
        user = getpass.getuser()
        (tmp / "sshd_config").write_text("\n".join([
            *(f"ListenAddress {h}:{self.port}" for h in HOSTS),
            f"HostKey {tmp / 'host_key'}", f"AuthorizedKeysFile {tmp / 'authorized_keys'}", f"PidFile {tmp / 'sshd.pid'}",
            "UsePAM no", "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", f"AllowUsers {user}", "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", ""]))
        os.makedirs("/run/sshd", exist_ok=True) if os.geteuid() == 0 else None
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")],
                                     stdout=open(tmp / "sshd.log", "ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: all(_listening(h, self.port) for h in HOSTS) or self.proc.poll() is not None, 10, "sshd")
        assert self.proc.poll() is None, (tmp / "sshd.log").read_text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


@pytest.fixture
def sshd(tmp_path):
    d = tmp_path / "ssh"
    d.mkdir()
    server = Sshd(d)
    yield server
    server.stop()


class FleetFile(type(Path())):  # type: ignore[misc]
    topic = realm = ""


def fleet_file(tmp: Path, sshd: Sshd, broker, mock, hosts: list[str] | None = None, key: str = "user_key",
               **more: object) -> FleetFile:
    topic = f"fleet-{uuid.uuid4().hex[:6]}"
    realm = f"realm-{uuid.uuid4().hex[:6]}"
    template = write_config(tmp / "template", mock.port, broker.port, topic=topic, rest_port=_port_free_on(HOSTS),
                            runtime={"module_dir": str(ROOT / "runtimes"), "status_interval_ms": 500,
                                     "drain_timeout_s": 3, "orchestrator": {"realm": realm, "reg_timeout_s": 0.5}})
    doc = {"name": "kitchen", "hosts": hosts or HOSTS,
           "ssh": {"user": getpass.getuser(), "port": sshd.port, "identity_file": str(sshd.dir / key),
                   "known_hosts": str(sshd.dir / "known_hosts")},
           "command": f"{sys.executable} -m runtime_manager", "root": str(tmp / "hosts" / "{host}"),
           "template": str(template), "broker": {"host": "127.0.0.1", "port": broker.port},
           "defaults": {"workers": 8, "log_level": "info"}, "environment": {"PYTHONPATH": str(ROOT)},
           "connect_timeout_s": 3, "ready_timeout_s": 30, **more}
    path = FleetFile(tmp / "fleet.yaml")
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    path.topic, path.realm = topic, realm
    return path


def fleet(path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime_manager", "fleet", *args, "-f", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def pids(tmp: Path) -> dict[str, int]:
    found = {}
    for h in HOSTS:
        pid_file = tmp / "hosts" / h / "node.pid"
        if pid_file.exists():
            found[h] = int(pid_file.read_text())
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_fleet_configured_started_watched_stopped_and_cleaned(tmp_path, sshd, broker, mock):
    path = fleet_file(tmp_path, sshd, broker, mock)
    started: dict[str, int] = {}
    try:
        done = fleet(path, "configure")
        assert done.returncode == 0 and done.stdout.count("configured") == 3, done.stdout + done.stderr
        done = fleet(path, "start")
        assert done.returncode == 0, done.stdout + done.stderr
        for h in HOSTS:
            assert f"{h}" in done.stdout and "ready (" in done.stdout
        started = pids(tmp_path)
        assert len(started) == 3 and all(alive(p) for p in started.values())
        # each node answers a flow through its own REST address, and over MQTT
        port = json.loads((tmp_path / "hosts" / HOSTS[0] / "config" / "comm.conf").read_text())["rest"]["port"]
        for h in HOSTS:
            answer = requests.post(f"http://{h}:{port}/startrm", json={"id_flow": "1", "payload": "p"}, timeout=20)
            assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
        comm = json.loads((tmp_path / "hosts" / HOSTS[0] / "config" / "comm.conf").read_text())
        probe = MqttProbe(broker.port, topics=(comm["mqtt"].get("result_topic") or f"{path.topic}/result",))
        try:
            for i in (1, 2, 3):
                result = probe.request("1", "p", topic=f"{path.topic}/node/{i}", timeout=20)
                assert result["status"] == "ok" and str(result["node"]) == str(i), result
        finally:
            probe.close()
        done = fleet(path, "status", "--json")
        rows = json.loads(done.stdout)
        assert [(r["host"], r["node"], r["broker"], r["process"]) for r in rows] == [
            (h, str(i), "ready", "running") for i, h in enumerate(HOSTS, 1)]
        # the modules each node runs, in status
        runtime = json.loads((tmp_path / "hosts" / HOSTS[0] / "state" / "runtime_state.json").read_text())["runtime_uuid"]
        probe = MqttProbe(broker.port, topics=(f"{path.realm}/proc/stdio/#",))
        try:
            probe.publish({"object_id": "1", "action": "create", "type": "req", "data": {
                "type": "module", "uuid": str(uuid.uuid4()), "name": "ticker", "file": "ticker.wat", "parent": runtime}},
                topic=f"{path.realm}/proc/control/{runtime}")
        finally:
            probe.close()
        wait_for(lambda: json.loads(fleet(path, "status", "--json").stdout)[0]["modules"] == ["ticker"], 15,
                 "the module in status")
        assert [r["modules"] for r in json.loads(fleet(path, "status", "--json").stdout)][1:] == [[], []]
        # a node killed on its host: status shows it, start brings back that one only
        os.kill(started[HOSTS[1]], signal.SIGKILL)
        wait_for(lambda: json.loads(fleet(path, "status", "--json").stdout)[1]["broker"] == "offline", 15,
                 "the killed node seen offline")
        rows = json.loads(fleet(path, "status", "--json").stdout)
        assert rows[1]["process"] == "stopped" and rows[0]["broker"] == rows[2]["broker"] == "ready"
        done = fleet(path, "start")
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("already running") == 2 and "started, pid" in done.stdout
        again = pids(tmp_path)
        assert again[HOSTS[0]] == started[HOSTS[0]] and again[HOSTS[2]] == started[HOSTS[2]]
        assert again[HOSTS[1]] != started[HOSTS[1]]
        started = again
        # a module on every node, outputs merged by host
        done = fleet(path, "run", "args.wat", "a", "b")
        assert done.returncode == 0, done.stdout + done.stderr
        for h in HOSTS:
            assert f"{h}" in done.stdout
        assert done.stdout.count("  a\n") == 3 and done.stdout.count("  b\n") == 3
        assert fleet(path, "version").stdout.count("runtime-manager ") == 3
        assert "engine started" in fleet(path, "logs", "-n", "200").stdout
        assert fleet(path, "cmd", "echo", "hi").stdout.count("  hi\n") == 3
        # files to every host and back
        (tmp_path / "notes.txt").write_text("for every host\n")
        done = fleet(path, "put", str(tmp_path / "notes.txt"), "extra")
        assert done.returncode == 0 and done.stdout.count("notes.txt ->") == 3, done.stdout + done.stderr
        assert all((tmp_path / "hosts" / h / "extra" / "notes.txt").read_text() == "for every host\n" for h in HOSTS)
        done = fleet(path, "get", "logs/node.log", str(tmp_path / "fetched"))
        assert done.returncode == 0, done.stdout + done.stderr
        assert all("engine started" in (tmp_path / "fetched" / h / "node.log").read_text() for h in HOSTS)
        # kill: one host, SIGKILL now
        victim = started[HOSTS[2]]
        done = fleet(path, "kill", "--host", HOSTS[2])
        assert done.returncode == 0 and f"killed (pid {victim})" in done.stdout, done.stdout
        assert not alive(victim)
        assert fleet(path, "start", "--host", HOSTS[2]).returncode == 0
        started = pids(tmp_path)
        # stop: all offline, no process left
        done = fleet(path, "stop")
        assert done.returncode == 0 and done.stdout.count("stopped (pid") == 3, done.stdout + done.stderr
        assert not any(alive(p) for p in started.values())
        rows = json.loads(fleet(path, "status", "--json").stdout)
        assert {r["broker"] for r in rows} == {"offline"} and {r["process"] for r in rows} == {"stopped"}
        # clean: nothing left on the hosts, no retained status
        done = fleet(path, "clean")
        assert done.returncode == 0, done.stdout + done.stderr
        assert not any((tmp_path / "hosts" / h).exists() for h in HOSTS)
        rows = json.loads(fleet(path, "status", "--json").stdout)
        assert {r["broker"] for r in rows} == {"unknown"} and {r["process"] for r in rows} == {"absent"}
        records = MqttProbe(broker.port, topics=(f"{path.realm}/rm/presence/+",))  # the runtimes' records are gone too
        try:
            time.sleep(1.0)
            assert [t for t, p in records.messages if p] == []
        finally:
            records.close()
    finally:
        for pid in pids(tmp_path).values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_hosts_that_cannot_be_reached_are_named_and_the_others_start(tmp_path, sshd, broker, mock):
    """127.0.0.5 has no SSH server; a fleet with a key the hosts do not accept fails on each, by name."""
    path = fleet_file(tmp_path, sshd, broker, mock, hosts=[HOSTS[0], "127.0.0.5"])
    try:
        done = fleet(path, "start")
        assert done.returncode != 0
        assert "127.0.0.5" in done.stdout and "unreachable" in done.stdout, done.stdout
        assert "1 of 2 host(s) failed: 127.0.0.5" in done.stdout
        assert f"{HOSTS[0]}" in done.stdout and "ready (" in done.stdout
        assert fleet(path, "stop").returncode != 0  # 127.0.0.5 still cannot be reached
        # a port already taken on a host: that node exits, the start says so from its log
        port = json.loads((tmp_path / "hosts" / HOSTS[0] / "config" / "comm.conf").read_text())["rest"]["port"]
        with socket.socket() as taken:
            taken.bind((HOSTS[0], port))
            taken.listen()
            done = fleet(path, "start", "--host", HOSTS[0])
        assert done.returncode != 0 and "not ready: exited" in done.stdout, done.stdout
        assert "in use" in done.stdout or "address" in done.stdout.lower()
        assert not any(alive(p) for p in pids(tmp_path).values())
        wrong = fleet_file(tmp_path / "wrong", sshd, broker, mock, key="stranger_key")
        done = fleet(wrong, "status")
        assert done.returncode != 0 and done.stdout.count("authentication refused") == 3, done.stdout
        bad = fleet(wrong, "start")
        assert bad.returncode != 0 and bad.stdout.count("failed: authentication refused") == 3, bad.stdout
        assert "3 of 3 host(s) failed" in bad.stdout
    finally:
        for pid in pids(tmp_path).values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_fleet_file_with_mistakes_is_refused_with_file_and_line(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("name: kitchen\nhosts: [a, a]\nssh: {user: pi, password: x}\ncommand: rm\nroot: /var/lib/rm\n"
                    "template: nowhere\nbroker: {host: b}\ndefaults: {workers: 8, colour: blue}\nnodes: {z: {}}\n")
    done = fleet(path, "configure")
    assert done.returncode == 2
    errors = done.stderr.splitlines()
    assert f"{path}:2: hosts: a is given twice" in errors
    assert any(e.startswith(f"{path}:3: ssh.password: no passwords") for e in errors)
    assert any(e.startswith(f"{path}:5: root: must hold {{host}}") for e in errors)
    assert any(e.startswith(f"{path}:6: template:") for e in errors)
    assert any(e.startswith(f"{path}:8: defaults.colour: unknown setting") for e in errors)
    assert any(e.startswith(f"{path}:9: nodes.z: is not one of the fleet's hosts") for e in errors)
    path.write_text("name: [unclosed\n")
    done = fleet(path, "status")
    assert done.returncode == 2 and done.stderr.startswith(f"{path}:2:") and "not valid YAML" in done.stderr


def test_hostfile_ranges_and_a_command_missing_on_the_hosts(tmp_path, sshd, broker, mock):
    from runtime_manager.fleet.spec import load_fleet

    (tmp_path / "hosts.txt").write_text("# the kitchen\nedge[08-11]\n10.0.0.1  # the hub\n")
    doc = json.loads(fleet_file(tmp_path, sshd, broker, mock).read_text())
    del doc["hosts"]
    doc["hostfile"] = "hosts.txt"
    (tmp_path / "ranges.yaml").write_text(json.dumps(doc))
    fleet_ = load_fleet(tmp_path / "ranges.yaml")
    assert [(h.address, h.node_id) for h in fleet_.hosts] == [
        ("edge08", "1"), ("edge09", "2"), ("edge10", "3"), ("edge11", "4"), ("10.0.0.1", "5")]
    missing = fleet_file(tmp_path / "missing", sshd, broker, mock, command="/nowhere/runtime-manager")
    done = fleet(missing, "start")
    assert done.returncode != 0 and done.stdout.count("failed: command not found on the host: /nowhere/runtime-manager") == 3, \
        done.stdout
