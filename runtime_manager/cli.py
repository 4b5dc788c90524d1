"""What every command shares: arguments, loading and checking the config, running a node."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .config import Config, WasmComponent, load_config, resolve_config_dir
from .core.errors import ConfigError
from .logs import setup_logging


def program() -> str:
    """How the user called us: `runtime-manager` (installed) or `python -m runtime_manager`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name in ("runtime-manager", "rm-mqtt", "rm-api") else "python -m runtime_manager"


def add_config_dir(parser: argparse.ArgumentParser, what: str = "configuration directory") -> None:
    """`--config-dir`, as every command takes it."""
    parser.add_argument("--config-dir", help=f"{what} (else $RM_CONFIG_DIR, else ./config_files)")


def base_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_dir(parser)
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="overrides comm.conf log.level")
    parser.add_argument("--node-id", help="overrides runtime.conf node_id")
    return parser


def load_checked(config_dir: Path) -> Config:
    """Load the configuration and check its WebAssembly modules (they compile and
    export what the endpoints name). Raises `ConfigError` with every problem."""
    config = load_config(config_dir)
    if any(isinstance(c, WasmComponent) for c in config.components.values()):
        from .wasm.modules import inspect_components  # wasmtime only where WebAssembly runs

        problems = inspect_components(config)
        if problems:
            raise ConfigError(problems)
    return config


def load_or_exit(args: argparse.Namespace) -> Config:
    """Load and check the configuration; on errors print every one and exit 1."""
    config_dir = resolve_config_dir(args.config_dir)
    try:
        config = load_checked(config_dir)
    except ConfigError as exc:
        setup_logging(args.log_level or "INFO")
        print(f"configuration in {config_dir} has {len(exc.errors)} error(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        sys.exit(1)
    setup_logging(args.log_level or config.log.level, config.log.file)
    return with_overrides(config, args)


def with_overrides(config: Config, args: argparse.Namespace) -> Config:
    """The configuration with what the command line overrides (--node-id, --port)."""
    if args.node_id:
        config = replace(config, runtime=replace(config.runtime, node_id=args.node_id))
        if config.mqtt.client_id:  # two nodes of one directory must not share a client id
            config = replace(config, mqtt=replace(config.mqtt, client_id=f"{config.mqtt.client_id}-{args.node_id}"))
    if getattr(args, "port", None):
        config = replace(config, rest=replace(config.rest, port=args.port))
    return config


def reloader(args: argparse.Namespace, worker: int | None = None) -> Callable[[], Config]:
    """How a running node reads its configuration again (SIGHUP): the same
    directory, checks and overrides as at its start. Raises `ConfigError`."""
    config_dir = resolve_config_dir(args.config_dir)

    def load() -> Config:
        config = with_overrides(load_checked(config_dir), args)
        return worker_config(config, worker) if worker is not None else config

    return load


def worker_config(config: Config, index: int) -> Config:
    """The configuration of worker `index` of `serve --processes`: a client id of
    its own (the same each time it is started again, so it finds its MQTT session),
    and one shared subscription for all workers of the node."""
    mq = config.mqtt
    base = mq.client_id or f"rm-{config.node_name}-{mq.topic}"
    return replace(config, mqtt=replace(mq, client_id=f"{base}-w{index}",
                                        shared_group=mq.shared_group or f"rm-{config.node_name}"))
