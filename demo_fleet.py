"""The demo behind `make fleet`: a fleet of three nodes on three "hosts" of
this machine, driven over SSH from one YAML file.

  - the hosts: one OpenSSH server listening on 127.0.0.2, 127.0.0.3 and
    127.0.0.4 (loopback has all of 127.0.0.0/8), with host and user keys made
    for the demo; it runs as you, so it may need root (sshd wants /run/sshd);
  - the broker: Mosquitto with config_files/mosquitto.conf on a free port;
  - test/mock_services.py: the components the flows call.

Then, as an operator would: `fleet configure`, `start`, `status`, `run` a
module on every node, a node killed on its host and `status` again, `start`
(which brings back that one only), `stop` and `clean`. Everything lives under
run/fleet/ (the fleet file is run/fleet/fleet.yaml: try the commands yourself
while the demo waits at the end, with --keep).

    python demo_fleet.py [--keep]
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))

from conftest import write_config  # noqa: E402
from helpers import free_port  # noqa: E402
from test_fleet import HOSTS, Sshd, _port_free_on  # noqa: E402

from demo import wait_port  # noqa: E402

FLEET_YAML = """\
name: demo
hosts: [{hosts}]
ssh: {{user: {user}, port: {ssh_port}, identity_file: ssh/user_key, known_hosts: ssh/known_hosts}}
command: {python} -m runtime_manager        # the installed node on each host (here: this checkout)
root: {work}/hosts/{{host}}                  # each host's config, modules, state and log
template: template                          # the config directory each node's is made from
broker: {{host: 127.0.0.1, port: {broker_port}}}
defaults: {{workers: 8, status_interval_ms: 500, log_level: info}}
nodes:
  127.0.0.3: {{workers: 16}}
environment: {{PYTHONPATH: {root}}}
"""


def fleet(path: Path, *args: str) -> int:
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"\n$ runtime-manager fleet {' '.join(args)} -f {shown}", flush=True)
    return subprocess.run([sys.executable, "-m", "runtime_manager", "fleet", *args, "-f", str(path)], cwd=ROOT).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the fleet running at the end until Enter")
    parser.add_argument("--work", type=Path, default=ROOT / "run" / "fleet", help="where the demo keeps its files")
    args = parser.parse_args()
    if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        raise SystemExit("make fleet needs OpenSSH's server (apt-get install openssh-server; `make test` installs it)")
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "ssh").mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    log = open(work / "demo.log", "ab")
    sshd = None
    try:
        try:
            sshd = Sshd(work / "ssh")
        except (AssertionError, OSError) as exc:
            raise SystemExit(f"could not start sshd on {', '.join(HOSTS)} (it may need root): {exc}") from None
        broker_port, mock_port = free_port(), free_port()
        conf = (ROOT / "config_files" / "mosquitto.conf").read_text().replace("listener 1883", f"listener {broker_port}")
        (work / "mosquitto.conf").write_text(conf + ("user root\n" if os.geteuid() == 0 else ""))
        procs.append(subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                       str(work / "mosquitto.conf")], stdout=log, stderr=log))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "test" / "mock_services.py"), "--port", str(mock_port)],
                                      stdout=log, stderr=log))
        wait_port(broker_port, "the broker")
        wait_port(mock_port, "the mock services")
        write_config(work / "template", mock_port, broker_port, rest_port=_port_free_on(HOSTS),
                     runtime={"module_dir": str(ROOT / "runtimes"), "orchestrator": {"realm": "demo", "reg_timeout_s": 0.5}})
        path = work / "fleet.yaml"
        path.write_text(FLEET_YAML.format(hosts=", ".join(HOSTS), user=getpass.getuser(), ssh_port=sshd.port,
                                          python=sys.executable, work=work, broker_port=broker_port, root=ROOT))
        print(f"The fleet file, {path}:\n\n{path.read_text()}")
        fleet(path, "configure")
        fleet(path, "start")
        fleet(path, "status")
        fleet(path, "run", "args.wat", "hello", "fleet")
        pid = int((work / "hosts" / HOSTS[1] / "node.pid").read_text())
        print(f"\n$ kill -KILL {pid}      # node 2, on its host {HOSTS[1]}", flush=True)
        os.kill(pid, signal.SIGKILL)
        time.sleep(2)
        fleet(path, "status")
        fleet(path, "start")
        if args.keep:
            print(f"\nThe fleet runs. Try: {sys.executable} -m runtime_manager fleet status -f {path}\n"
                  "Enter stops and cleans it.", flush=True)
            input()
        fleet(path, "stop")
        fleet(path, "clean")
    finally:
        for pid_file in (work / "hosts").glob("*/node.pid"):
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
        for p in reversed(procs):
            p.terminate()
            p.wait(10)
        if sshd is not None:
            sshd.stop()


if __name__ == "__main__":
    main()
