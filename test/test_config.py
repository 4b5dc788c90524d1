"""Loading and validating the config directory, and `python -m runtime_manager check`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ORIGINAL, ROOT, SHIPPED

from runtime_manager.config import load_config, resolve_config_dir
from runtime_manager.core.errors import ConfigError


def copy_original(tmp_path: Path) -> Path:
    dest = tmp_path / "cfg"
    shutil.copytree(ORIGINAL, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    return dest


def errors(cfg: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    return exc.value.errors


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def test_original_fractal_files_load_unchanged():
    config = load_config(ORIGINAL)
    assert config.mqtt.topic == "component_msg" and config.mqtt.port == 1883 and config.mqtt.keepalive == 60
    assert config.mqtt.qos == 1 and config.mqtt.result_topic == "component_msg/result"
    assert config.rest.endpoint == "/startrm" and config.rest.port == 5000
    assert config.components["component2"].url("2") == "http://127.0.0.1:6000/endpoint2"
    assert config.load_balancer.policy == "external"
    assert config.load_balancer.url == "http://127.0.0.1:6000/LB/id_node"
    assert config.nodes["3"].url == "http://127.0.0.1:6000/nodo3"
    assert config.runtime.node_id is None


def test_shipped_config_is_valid():
    config = load_config(SHIPPED)
    assert config.flows and config.components


def test_port_written_as_a_string_is_accepted(tmp_path):
    cfg = copy_original(tmp_path)
    edit_json(cfg / "components.conf", lambda d: d["component1"]["config"].update(port="6001"))
    assert load_config(cfg).components["component1"].port == 6001


def test_bad_values_are_all_reported_with_their_key_path(tmp_path):
    cfg = copy_original(tmp_path)
    edit_json(cfg / "components.conf", lambda d: d["component1"]["config"].update(port="sixty"))
    edit_json(cfg / "components.conf", lambda d: d["component2"]["config"].update(port=70000, timout_s=3))
    edit_json(cfg / "comm.conf", lambda d: d["mqtt"].update(qos=5))
    edit_json(cfg / "nodes.conf", lambda d: d["2"]["config"].pop("ip"))
    errs = errors(cfg)
    assert "components.conf: component1.config.port: expected a number, got 'sixty'" in errs
    assert "components.conf: component2.config.port: not a TCP port: 70000" in errs
    assert any(e.startswith("components.conf: component2.config.timout_s: unknown key") for e in errs)
    assert "comm.conf: mqtt.qos: must be 0, 1 or 2, got 5" in errs
    assert "nodes.conf: 2.config.ip: is required" in errs


def test_json_syntax_error_names_line_and_column(tmp_path):
    cfg = copy_original(tmp_path)
    (cfg / "load_balancer.conf").write_text('{\n  "protocol": "http",\n  "ip": "127.0.0.1"\n  "port": 6000\n}\n')
    assert errors(cfg) == ["load_balancer.conf:4:3: invalid JSON: Expecting ',' delimiter"]


def test_flow_errors_and_json_errors_together(tmp_path):
    cfg = copy_original(tmp_path)
    (cfg / "flows.conf").write_text("1\nTO component1 1\nPOTS payload\n")
    edit_json(cfg / "comm.conf", lambda d: d["mqtt"].pop("topic"))
    errs = errors(cfg)
    assert "comm.conf: mqtt.topic: is required" in errs
    assert "flows.conf:3:1: unknown instruction 'POTS' (expected TO, GET, POST, IF, PARALLEL, RUN, PUBLISH, RETURN, FAIL or ON ERROR)" in errs


def test_missing_files(tmp_path):
    cfg = copy_original(tmp_path)
    (cfg / "components.conf").unlink()
    errs = errors(cfg)
    assert errs[0].startswith("components.conf: file not found")
    # and every flow's TO now names an unknown component
    assert any("unknown component 'component1'" in e for e in errs)


def test_config_dir_from_flag_env_or_default(monkeypatch, tmp_path):
    monkeypatch.delenv("RM_CONFIG_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_config_dir(None) == tmp_path / "config_files"
    monkeypatch.setenv("RM_CONFIG_DIR", "/somewhere")
    assert resolve_config_dir(None) == Path("/somewhere")
    assert resolve_config_dir("/flag") == Path("/flag")


def run_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime_manager", "check", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_check_ok_prints_one_line_per_file():
    out = run_check("--config-dir", str(ORIGINAL))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "comm.conf", "components.conf", "flows.conf", "load_balancer.conf", "nodes.conf", "runtime.conf"
    ]
    assert "3 flows: 1, 2, 3" in out.stdout


def test_check_reports_every_error_and_exits_1(tmp_path):
    cfg = copy_original(tmp_path)
    (cfg / "flows.conf").write_text("1\nTO component1 1\nPOTS payload\n\n2\nTO nope 1\nGET\n")
    edit_json(cfg / "components.conf", lambda d: d["component1"]["config"].update(port="x"))
    out = run_check("--config-dir", str(cfg))
    assert out.returncode == 1
    assert "flows.conf:3:1: unknown instruction 'POTS' (expected TO, GET, POST, IF, PARALLEL, RUN, PUBLISH, RETURN, FAIL or ON ERROR)" in out.stdout
    assert "components.conf: component1.config.port: expected a number, got 'x'" in out.stdout


def test_check_reads_rm_config_dir(tmp_path):
    import os

    cfg = copy_original(tmp_path)
    out = run_check(env={**os.environ, "RM_CONFIG_DIR": str(cfg)})
    assert out.returncode == 0 and str(cfg) not in out.stderr


def test_entry_point_refuses_to_start_on_bad_config(tmp_path):
    cfg = copy_original(tmp_path)
    (cfg / "flows.conf").write_text("1\nGET\n")
    for module in ("rm_mqtt", "rm_api"):
        out = subprocess.run([sys.executable, "-m", f"runtime_manager.{module}", "--config-dir", str(cfg)],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 1
        assert "flows.conf:2:1: GET before any TO in flow '1'" in out.stderr


def _comm(tmp_path: Path, mqtt: dict, rest: dict | None = None) -> Path:
    cfg = tmp_path / "cfg"
    shutil.copytree(ORIGINAL, cfg)
    comm = json.loads((cfg / "comm.conf").read_text())
    comm["mqtt"].update(mqtt)
    comm["rest"].update(rest or {})
    (cfg / "comm.conf").write_text(json.dumps(comm))
    return cfg


def test_strings_may_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RM_TEST_BROKER", "broker.example")
    monkeypatch.delenv("RM_TEST_PORT", raising=False)
    cfg = _comm(tmp_path, {"host": "${RM_TEST_BROKER}", "port": "${RM_TEST_PORT:-1884}", "topic": "t/${RM_TEST_BROKER}"})
    config = load_config(cfg)
    assert config.mqtt.host == "broker.example" and config.mqtt.port == 1884 and config.mqtt.topic == "t/broker.example"


def test_a_missing_variable_names_the_file_and_key(tmp_path, monkeypatch):
    monkeypatch.delenv("RM_TEST_NOPE", raising=False)
    cfg = _comm(tmp_path, {"host": "${RM_TEST_NOPE}"})
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert "comm.conf: mqtt.host: environment variable RM_TEST_NOPE is not set" in exc.value.errors[0]


def test_secrets_from_files_and_never_printed(tmp_path):
    (tmp_path / "pw").write_text("hunter2\n")
    (tmp_path / "tok").write_text("t0ken")
    cfg = _comm(tmp_path, {"username": "u", "password_file": str(tmp_path / "pw")}, {"token_file": str(tmp_path / "tok")})
    config = load_config(cfg)
    assert config.mqtt.password == "hunter2" and config.rest.token == "t0ken"
    out = subprocess.run([sys.executable, "-m", "runtime_manager", "check", "--config-dir", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "hunter2" not in out.stdout + out.stderr and "t0ken" not in out.stdout + out.stderr
    both = _comm(tmp_path / "b", {"password": "x", "password_file": str(tmp_path / "pw")}, {"token_file": str(tmp_path / "no")})
    with pytest.raises(ConfigError) as exc:
        load_config(both)
    errors = "\n".join(exc.value.errors)
    assert "comm.conf: mqtt.password: give password or password_file, not both" in errors
    assert "comm.conf: rest.token_file: cannot read the secret file" in errors


# the original's files as it shipped them (sha256, first 16 hex digits): an edit would hide a break of compatibility
ORIGINAL_SUMS = {'comm.conf': '4d66af1e66c53909', 'components.conf': 'daa076cd0cba2b8c', 'flows.conf': 'a73a71f7a6ec9f98', 'load_balancer.conf': '6ce25f66df1335ba', 'nodes.conf': 'b80833ca9cbcfee3'}


def test_the_copy_of_the_original_config_files_is_exact_and_loads():
    import hashlib

    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in ORIGINAL.glob("*.conf")} == ORIGINAL_SUMS
    assert load_config(ORIGINAL).flows


def test_membership_and_tracing_settings_are_checked_by_name(tmp_path):
    cfg = copy_original(tmp_path)
    (cfg / "runtime.conf").write_text(json.dumps({
        "group": "a/b", "status_heartbeat_ms": 10, "load_report_delta": 0, "presence_keepalive_s": 0,
        "tracing": {"otlp_endpoint": "collector:4318", "sampling_ratio": 1.5, "headers": {"k": 1}, "colour": "red"}}))
    found = "\n".join(errors(cfg))
    for expected in ("runtime.conf: group: must be one topic level", "runtime.conf: status_heartbeat_ms: must be 50",
                     "runtime.conf: load_report_delta: must be more than 0", "runtime.conf: presence_keepalive_s: must be 1",
                     "runtime.conf: tracing.otlp_endpoint: must be an http:// or https:// URL",
                     "runtime.conf: tracing.sampling_ratio: must be from 0 to 1",
                     "runtime.conf: tracing.headers: must be an object of strings", "tracing.colour"):
        assert expected in found, found
    (cfg / "runtime.conf").write_text(json.dumps({"group": "site-1", "tracing": {"otlp_endpoint": "http://c:4318/v1/traces"}}))
    rt = load_config(cfg).runtime
    assert rt.group == "site-1" and rt.status_heartbeat_ms == 5000  # a named group's heartbeat
    assert rt.tracing is not None and rt.tracing.sampling_ratio == 1.0
    (cfg / "runtime.conf").write_text("{}")
    rt = load_config(cfg).runtime
    assert rt.group == "" and rt.status_heartbeat_ms == 1000 and rt.tracing is None  # as before
