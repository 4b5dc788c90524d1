"""The demo (`make run`) on a copy of the shipped config_files, moved to free ports."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SHIPPED
from helpers import free_port

from runtime_manager.config import load_config


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_runs_sample_requests_on_the_shipped_config(tmp_path, broker):
    cfg = tmp_path / "config_files"
    shutil.copytree(SHIPPED, cfg)
    shutil.copytree(ROOT / "runtimes", tmp_path / "runtimes")  # module_dir: ../runtimes
    ports = {"1883": free_port(), "5000": free_port(), "5001": free_port(), "6000": free_port()}
    for f in (f for f in cfg.iterdir() if f.is_file()):  # not examples/
        text = f.read_text()
        for old, new in ports.items():
            text = text.replace(old, str(new))
        f.write_text(text)
    load_config(cfg)  # still valid
    out = subprocess.run([sys.executable, "demo.py", "--once", "--config-dir", str(cfg), "--broker", broker], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("  MQTT flow")]
    assert len(lines) == 4
    for line in lines:
        assert '"status": "ok"' in line
    assert "load balancer says node 2 -> node 2" in out.stdout
    assert "module args.wat on runtime node1 -> stdout: args | hello | from | the | demo; " in out.stdout
    assert "exited: exit code 0" in out.stdout
    assert "demo: stopped" in out.stdout
    assert ("embedded amqtt broker" in out.stdout) == (broker == "embedded")
    assert "Logging error" not in out.stderr


def test_make_cluster_runs_three_nodes_as_one_group(tmp_path):
    cfg = tmp_path / "config_files"
    shutil.copytree(SHIPPED, cfg)
    shutil.copytree(ROOT / "runtimes", tmp_path / "runtimes")
    rest = free_port()
    while not all(_free(rest + k) for k in range(3)):
        rest = free_port()
    ports = {"1883": free_port(), "5000": rest, "6000": free_port()}
    for f in (f for f in cfg.iterdir() if f.is_file()):  # not examples/
        text = f.read_text()
        for old, new in ports.items():
            text = text.replace(old, str(new))
        f.write_text(text)
    out = subprocess.run([sys.executable, "demo_cluster.py", "--config-dir", str(cfg), "--requests", "24", "--rate", "12"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cluster: 24 of 24 answered" in out.stdout, out.stdout[-3000:]
    assert "status: node 2 is offline (stopped)" in out.stdout and "cluster: stopped" in out.stdout
    ran = [line for line in out.stdout.splitlines() if line.startswith("  #")]
    assert len(ran) == 24 and all(" ok on node " in line for line in ran)


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_make_fleet_runs_the_life_of_a_fleet_over_ssh(tmp_path):
    out = subprocess.run([sys.executable, "demo_fleet.py", "--work", str(tmp_path / "fleet")], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert text.count("ready (") == 6 and text.count("already running (pid") == 2, text[-3000:]
    assert "127.0.0.3  2     offline  stopped" in text  # the node killed on its host, as status shows it
    assert text.count("stopped (pid") == 3 and text.count("removed ") == 3
    assert text.count("  hello\n") == 3
    assert not (tmp_path / "fleet" / "hosts").exists() or not any((tmp_path / "fleet" / "hosts").iterdir())
