"""What every entry point shares: arguments, loading the config, waiting for a signal."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import replace

from .config import Config, load_config, resolve_config_dir
from .errors import ConfigError
from .logs import setup_logging


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config-dir", help="configuration directory (else $RM_CONFIG_DIR, else ./config_files)")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="overrides comm.conf log.level")
    parser.add_argument("--node-id", help="overrides runtime.conf node_id")
    return parser


def load_or_exit(args: argparse.Namespace) -> Config:
    """Load and validate the configuration; on errors print every one and exit 1."""
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_config(config_dir)
    except ConfigError as exc:
        setup_logging(args.log_level or "INFO")
        print(f"configuration in {config_dir} has {len(exc.errors)} error(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        sys.exit(1)
    setup_logging(args.log_level or config.log.level, config.log.file)
    if args.node_id:
        config = replace(config, runtime=replace(config.runtime, node_id=args.node_id))
    return config


def wait_for_signal(log: logging.Logger) -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop.wait(1.0):
        pass
