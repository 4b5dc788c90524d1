"""`python -m runtime_manager <tool>`: tools for people.

  check   validate a configuration directory (exit 0, or 1 with every error)
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


TOOLS = {"check": check}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        print(__doc__, file=sys.stderr)
        return 2
    return TOOLS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
