"""{program} <command>:

  serve   run a node: every part the configuration enables (MQTT, REST, the
          orchestrator runtime) in one process
  check   validate a configuration directory (exit 0, or 1 with every error)
  reload  check the configuration directory, then have the running node read it again (SIGHUP)
  run     start a WebAssembly module on a runtime and stream its output until it exits
  list    the runtimes of a realm (alive, or when last heard) and their modules
  stop    stop a module by name or uuid

`{program} <command> --help` tells more.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace

from .cli import add_config_dir, base_parser, load_checked, load_or_exit, program, reloader, worker_config
from .config import Config, resolve_config_dir
from .core.errors import ConfigError


def serve(argv: list[str]) -> int:
    from .node import Parts
    from .process import run

    parser = base_parser("Run a node: the MQTT and REST entry points and, when configured, the orchestrator "
                         "runtime, in one process on one event loop.", prog=f"{program()} serve")
    parser.add_argument("--port", type=int, help="overrides comm.conf rest.port")
    parser.add_argument("--no-mqtt", action="store_true", help="do not take requests over MQTT")
    parser.add_argument("--no-rest", action="store_true", help="do not take requests over REST")
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="N worker processes on one shared MQTT subscription and one REST port, supervised")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # K/N: set by the supervisor
    parser.add_argument("--worker-loads", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = load_or_exit(args)
    if args.processes > 1 and not args.worker:
        from .supervisor import run_workers

        passed = [a for a in argv if not a.startswith("--processes")]
        if "--processes" in argv:  # "--processes N" as two words
            i = argv.index("--processes")
            passed = argv[:i] + argv[i + 2:]
        return run_workers(args.processes, passed, config.runtime.drain_timeout_s)
    parts = Parts(mqtt=not args.no_mqtt, rest=not args.no_rest, orchestrator=True)
    if args.worker:
        index, count = (int(x) for x in args.worker.split("/"))
        config = worker_config(config, index)
        parts = replace(parts, orchestrator=index == 0, publish_status=index == 0, reuse_port=True,
                        worker=index, workers=count, worker_loads=args.worker_loads)
    return run(config, parts, reload=reloader(args, parts.worker))


def check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{program()} check", description="Validate a configuration directory.")
    add_config_dir(parser)
    args = parser.parse_args(argv)
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_checked(config_dir)
    except ConfigError as exc:
        for error in exc.errors:
            print(error)
        print(f"{len(exc.errors)} error(s) in {config_dir}", file=sys.stderr)
        return 1
    for name, line in config.summary.items():
        print(f"{name}: ok: {line}")
    return 0


def reload(argv: list[str]) -> int:
    import json
    import os
    import signal
    import time
    import urllib.request

    parser = argparse.ArgumentParser(
        prog=f"{program()} reload",
        description="Check the configuration directory, then have the running node read it again (SIGHUP). The node "
                    "is found by its REST port (GET /status), or given by --pid; with --all, every node on this host "
                    "that runs on this directory is asked over the broker.")
    add_config_dir(parser)
    parser.add_argument("--pid", type=int, help="the node's process (the supervisor's under serve --processes)")
    parser.add_argument("--port", type=int, help="the node's REST port (else comm.conf rest.port)")
    parser.add_argument("--all", action="store_true",
                        help="every running node of this host that uses the directory (found by its status on the broker)")
    args = parser.parse_args(argv)
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_checked(config_dir)
    except ConfigError as exc:
        for error in exc.errors:
            print(error)
        print(f"{len(exc.errors)} error(s) in {config_dir}: the node was not asked to reload", file=sys.stderr)
        return 1
    if args.all:
        return reload_all(config)
    rest = config.rest
    host = "127.0.0.1" if rest.host in ("0.0.0.0", "::", "") else rest.host
    url = f"http://{host}:{args.port or rest.port}/status"

    def node_status() -> dict | None:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {rest.token}"} if rest.token else {})
        try:
            with urllib.request.urlopen(req, timeout=3) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    before = node_status()
    pid = args.pid
    if pid is None:
        if before is None:
            print(f"no node answers on {url}; give its process with --pid", file=sys.stderr)
            return 1
        pid = before.get("worker", {}).get("supervisor_pid") or before["pid"]
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"cannot signal process {pid}: {exc}", file=sys.stderr)
        return 1
    if before is None:
        print(f"asked process {pid} to reload {config_dir}")
        return 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = node_status()
        if now and now.get("config", {}).get("reloads", 0) > before.get("config", {}).get("reloads", 0):
            last = now["config"]["last_reload"]
            print(json.dumps(last, indent=2))
            return 0 if last.get("ok") else 1
    print(f"asked process {pid} to reload; it did not report the outcome within 15 s (see its log)", file=sys.stderr)
    return 1


def reload_all(config: Config, wait_s: float = 15.0) -> int:
    """Ask every running node of this host whose status names this configuration
    directory to reload (its control topic), and print what each says."""
    import json
    import socket
    import time
    import uuid

    from .core.topics import node_control_topic, status_topic
    from .tools import Session

    prefix, me = config.runtime.status_prefix, socket.gethostname()
    reply = f"{prefix}/tools/reload-{uuid.uuid4().hex[:12]}"
    session = Session(config, [status_topic(prefix, "+"), reply])
    try:
        time.sleep(0.3)  # the retained statuses come right after the subscription
        nodes: dict[str, dict] = {}
        for _topic, payload, _retained in list(session.messages):
            try:
                status = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(status, dict) or status.get("state") != "online":
                continue
            fresh = time.time() - float(status.get("time") or 0) < 3 * max(1.0, (status.get("interval_ms") or 1000) / 1000)
            here = (status.get("instance") or {}).get("host") == me
            if fresh and here and status.get("config_dir") == str(config.dir):
                nodes[str(status.get("node"))] = status
        if not nodes:
            print(f"no running node on this host publishes a status naming {config.dir} (on '{prefix}/+')",
                  file=sys.stderr)
            return 1
        command_id = str(uuid.uuid4())
        for node in sorted(nodes):
            session.publish(node_control_topic(prefix, node), {"command": "reload", "id": command_id, "reply_to": reply})

        def answers() -> dict[str, dict]:
            found = {}
            for topic, payload, _r in list(session.messages):
                if topic == reply:
                    try:
                        answer = json.loads(payload)
                    except ValueError:
                        continue
                    if isinstance(answer, dict) and answer.get("id") == command_id:
                        found[str(answer.get("node"))] = answer.get("reload") or {}
            return found

        with session.cond:
            session.cond.wait_for(lambda: set(answers()) >= set(nodes), wait_s)
        got = answers()
    finally:
        session.close()
    ok = True
    for node in sorted(nodes):
        outcome = got.get(node)
        if outcome is None:
            ok = False
            print(f"node {node}: no answer within {wait_s:g} s (see its log)")
            continue
        ok = ok and bool(outcome.get("ok"))
        print(f"node {node}: {json.dumps(outcome)}")
    return 0 if ok else 1


def _orchestrator_tool(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from .tools import main as tools_main

        try:
            return tools_main(name, argv)
        except ConfigError as exc:
            for error in exc.errors:
                print(error, file=sys.stderr)
            return 1

    return run


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": serve, "check": check, "reload": reload, "run": _orchestrator_tool("run"), "list": _orchestrator_tool("list"),
    "stop": _orchestrator_tool("stop"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.format(program=program()))
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.format(program=program()), file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
