"""The demo (`make run`) on a copy of the shipped config_files, moved to free ports."""

from __future__ import annotations

import json
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
    for f in cfg.iterdir():
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


def test_postman_collection_is_valid_json():
    data = json.loads((ROOT / "test" / "postman_collection.json").read_text())
    assert any(item["request"]["method"] == "POST" for item in data["item"])
