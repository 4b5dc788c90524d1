"""Packaging and running under a service manager: `pip install .` gives the
console scripts, the systemd unit in deploy/ parses, and a node speaks the
systemd notify protocol (ready, reloading, stopping)."""

from __future__ import annotations

import configparser
import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHIPPED, RmProcess, write_config
from helpers import free_port, wait_for

UNIT = ROOT / "deploy" / "runtime-manager.service"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install .` of a copy of the repository (the build leaves nothing in the work tree)."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, src / name)
    for name in ("runtime_manager", "grammar"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), str(src)], check=True, timeout=300, capture_output=True)
    return target


def test_pip_install_gives_the_console_scripts(installed, tmp_path):
    env = {"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(installed / "bin" / "runtime-manager"), "check", "--config-dir", str(SHIPPED)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "flows.conf: ok: 4 flows" in done.stdout  # the grammar came with the package
    for script in ("rm-mqtt", "rm-api"):
        usage = subprocess.run([str(installed / "bin" / script), "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=60)
        assert usage.returncode == 0 and "--config-dir" in usage.stdout, usage.stderr
    where = subprocess.run([sys.executable, "-c", "import runtime_manager; print(runtime_manager.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(installed))  # the installed copy ran, not the work tree


def test_the_systemd_unit_parses(installed, tmp_path):
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # keys are case-sensitive
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify" and service["ExecStart"].endswith("runtime-manager serve")
    assert service["ExecReload"].endswith("runtime-manager reload --pid $MAINPID")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # no systemd on this machine: the parse above is what can be checked
        return
    local = tmp_path / "runtime-manager.service"  # its commands pointed at the copy installed above
    local.write_text(UNIT.read_text().replace("/opt/runtime-manager/bin/", f"{installed}/bin/"))
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_a_node_tells_systemd_it_is_ready_reloading_and_stopping(tmp_path, broker, mock, processes):
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(20)
    try:
        cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=free_port(), runtime={"node_id": "1"})
        node = RmProcess("serve", cfg, env={"NOTIFY_SOCKET": str(sock_path)}).start(ready=None)
        processes.append(node)
        ready = listener.recv(4096).decode()
        assert ready.startswith("READY=1") and "STATUS=node 1: 3 flows" in ready, ready
        assert "engine started" in node.log() and "rest entry point" in node.log()  # every part started first
        node.proc.send_signal(signal.SIGHUP)
        assert listener.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert listener.recv(4096).decode().startswith("READY=1")
        node.proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode().startswith("STOPPING=1")
        assert node.proc.wait(20) == 0
    finally:
        listener.close()


def test_the_install_steps_as_written_give_a_node_that_checks_runs_and_keeps_its_state(installed, tmp_path, broker):
    """The unit's install steps, run as written in a scratch root (only the venv,
    the user and systemctl are left out), then the unit's own commands with its
    environment: `check` passes (modules found where the steps put them) and the
    orchestrator's state goes to StateDirectory=, not beside the read-only config."""
    root = tmp_path / "root"
    text = UNIT.read_text()
    steps = []
    for line in text.split("Install (as root", 1)[1].splitlines()[1:]:
        if not line.startswith("#   "):
            break
        steps += [part.strip() for part in line[4:].split("&&")]

    def here(command: str) -> str:  # the scratch root instead of /
        for top in ("/opt/", "/etc/", "/usr/local/", "/var/lib/"):
            command = command.replace(top, f"{root}{top}")
        return command

    bin_dir = root / "opt" / "runtime-manager" / "bin"
    for step in steps:
        if step.startswith(("python3 -m venv", "useradd", "systemctl")) or "/bin/pip install" in step:
            continue  # the venv is the package installed above; no users or systemd here
        if step.startswith("cp deploy/runtime-manager.service"):
            (root / "etc" / "systemd" / "system").mkdir(parents=True, exist_ok=True)
        done = subprocess.run(here(step), shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{step}: {done.stderr}"
    bin_dir.mkdir(parents=True)
    (bin_dir / "runtime-manager").write_text(f"#!/bin/sh\nexec {sys.executable} -m runtime_manager \"$@\"\n")
    (bin_dir / "runtime-manager").chmod(0o755)

    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str
    unit.read_string(text)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(installed)}
    for assignment in shlex.split(unit["Service"]["Environment"]):  # systemd's: NAME=value, space-separated
        name, _, value = assignment.partition("=")
        env[name] = here(value)
    state = root / "var" / "lib" / unit["Service"]["StateDirectory"]
    state.mkdir(parents=True)  # what systemd does for StateDirectory=
    env["STATE_DIRECTORY"] = str(state)
    docs = unit["Unit"]["Documentation"].removeprefix("file://")
    assert Path(here(docs)).is_file(), "Documentation= names a file the steps install"

    config_dir = Path(env["RM_CONFIG_DIR"])
    comm = json.loads((config_dir / "comm.conf").read_text())  # "then edit it": this test's broker and a free port
    comm["mqtt"]["port"], comm["rest"]["port"] = broker.port, free_port()
    (config_dir / "comm.conf").write_text(json.dumps(comm))
    workdir = Path(here(unit["Service"]["WorkingDirectory"]))
    check = subprocess.run(here(unit["Service"]["ExecStartPre"]).split(), cwd=workdir, env=env, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    node = subprocess.Popen(here(unit["Service"]["ExecStart"]).split(), cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (state / "runtime_state.json").is_file(), 20, "the runtime's uuids in the state directory")
        assert not (config_dir / "runtime_state.json").exists()
    finally:
        node.send_signal(signal.SIGTERM)
        output = node.communicate(timeout=30)[0].decode()
    assert node.returncode == 0, output


def test_every_package_of_the_tree_is_installed():
    """pyproject.toml lists the packages by hand: a folder moved or added must be listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "runtime_manager").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
