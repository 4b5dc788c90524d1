"""`python -m runtime_manager <tool>`: tools for people.

  check   validate a configuration directory (exit 0, or 1 with every error)
  run     start a WebAssembly module on a runtime and stream its output until it exits
  list    the runtimes of a realm and their modules (from their keepalives)
  stop    stop a module by name or uuid

`python -m runtime_manager <tool> --help` tells more.
"""

from __future__ import annotations

import argparse
import sys

from .config import load_config, resolve_config_dir
from .errors import ConfigError


def check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime_manager check", description="Validate a configuration directory.")
    parser.add_argument("--config-dir", help="configuration directory (else $RM_CONFIG_DIR, else ./config_files)")
    args = parser.parse_args(argv)
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_config(config_dir)
    except ConfigError as exc:
        for error in exc.errors:
            print(error)
        print(f"{len(exc.errors)} error(s) in {config_dir}", file=sys.stderr)
        return 1
    for name, line in config.summary.items():
        print(f"{name}: ok: {line}")
    return 0


def _orchestrator_tool(name: str):
    def run(argv: list[str]) -> int:
        from .tools import main as tools_main

        try:
            return tools_main(name, argv)
        except ConfigError as exc:
            for error in exc.errors:
                print(error, file=sys.stderr)
            return 1

    return run


TOOLS = {"check": check, "run": _orchestrator_tool("run"), "list": _orchestrator_tool("list"), "stop": _orchestrator_tool("stop")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        print(__doc__, file=sys.stderr)
        return 2
    return TOOLS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
