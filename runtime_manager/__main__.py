"""{program} <command>:

  serve   run a node: every part the configuration enables (MQTT, REST, the
          orchestrator runtime) in one process
  check   validate a configuration directory (exit 0, or 1 with every error)
  reload  check the configuration directory, then have the running node read it again (SIGHUP)
  run     start a WebAssembly module on a runtime and stream its output until it exits
  list    the runtimes of a realm (alive, or when last heard) and their modules
  stop    stop a module by name or uuid
  migrate move a running module to another runtime, with its state when it can
  resume  start a module again from its last checkpoint, on a runtime of your choice
  fleet   configure, start, watch and stop a group of nodes on many hosts over SSH (fleet --help)
  version this package's version

`{program} <command> --help` tells more.
"""

from __future__ import annotations

from . import hangup

hangup.take_early()  # before the imports below: a SIGHUP during start-up is a reload once started

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace

from .cli import add_config_dir, base_parser, load_checked, load_or_exit, program, reloader, worker_config
from .config import resolve_config_dir
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
    parser.add_argument("--explain", metavar="FLOW", action="append", default=[],
                        help="print this flow's plan: its requests, their bodies and where each value comes from")
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
    if args.explain:
        from .core.plans import explain

        for flow_id in args.explain:
            flow = config.flows.get(flow_id)
            if flow is None:
                print(f"no flow {flow_id!r} in flows.conf (flows: {', '.join(sorted(config.flows))})", file=sys.stderr)
                return 1
            print("\n".join(explain(flow)))
    return 0


def reload(argv: list[str]) -> int:
    from .reload_command import reload_all, reload_one

    parser = argparse.ArgumentParser(
        prog=f"{program()} reload",
        description="Check the configuration directory, then have the running node read it again (SIGHUP). The node "
                    "is found by its REST port (GET /status), or given by --pid; with --all, every node of this host "
                    "that runs on this directory (asked over the broker, or found on the REST ports the directory names).")
    add_config_dir(parser)
    parser.add_argument("--pid", type=int, help="the node's process (the supervisor's under serve --processes)")
    parser.add_argument("--port", type=int, help="the node's REST port (else comm.conf rest.port)")
    parser.add_argument("--all", action="store_true", help="every running node of this host that uses the directory")
    args = parser.parse_args(argv)
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_checked(config_dir)
    except ConfigError as exc:
        for error in exc.errors:
            print(error)
        print(f"{len(exc.errors)} error(s) in {config_dir}: no node was asked to reload", file=sys.stderr)
        return 1
    return reload_all(config) if args.all else reload_one(config, args.port, args.pid)


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


def _fleet(argv: list[str]) -> int:
    from .fleet.commands import main as fleet_main

    return fleet_main(argv, program())


def _version() -> int:
    from . import __version__

    print(f"runtime-manager {__version__}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": serve, "check": check, "reload": reload, "run": _orchestrator_tool("run"), "list": _orchestrator_tool("list"),
    "stop": _orchestrator_tool("stop"), "migrate": _orchestrator_tool("migrate"),
    "resume": _orchestrator_tool("resume"),
    "fleet": lambda argv: _fleet(argv), "version": lambda argv: _version(),
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
