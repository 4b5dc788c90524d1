"""Checking a module `create` into a `ModuleSpec`, or a `ControlError` that says why.

Pure functions of the message and the module directory: nothing runs here.
"""

from __future__ import annotations

import ast
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.topics import topic_name_problem
from ..logs import short
from ..wasm.channels import Channel

MAX_LIMIT_S = 30 * 86400  # the longest `args.limit` accepted: 30 days
MAX_REPEAT = 1_000_000_000


class ControlError(Exception):
    """A control message we cannot act on; the message says why."""


def _words(text: str, what: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:  # an unbalanced quote
        raise ControlError(f"{what} cannot be split into words: {exc}") from None


@dataclass
class ModuleSpec:
    uuid: str
    name: str
    path: Path
    argv: list[str]
    env: dict[str, str]
    dirs: list[tuple[str, str]]  # (host path, guest path)
    repeat: int = 1
    limit_s: float | None = None
    fault_crash: str = "ignore"
    channels: list[Channel] = field(default_factory=list)
    migratable: bool = True  # args.migratable: false keeps it from moving with its state
    checkpoint_s: float | None = None  # args.checkpoint_s: keep a checkpoint that often (None: the runtime's default)

    def as_create(self, module_dir: Path, parent: str, file_key: str = "file") -> dict[str, Any]:
        """The module as a create carries it, to runtime `parent` (a move starts it there)."""
        return {"type": "module", "uuid": self.uuid, "name": self.name, "parent": parent,
                file_key: str(self.path.relative_to(module_dir)),
                "args": {"argv": self.argv, "env": [f"{k}={v}" for k, v in self.env.items()],
                         "dirs": [guest for _, guest in self.dirs], "repeat": self.repeat, "limit": self.limit_s,
                         "fault_crash": self.fault_crash, "migratable": self.migratable,
                         "checkpoint_s": self.checkpoint_s},
                "channels": [c.as_message() for c in self.channels]}


def _decode_maybe(value: Any) -> Any:
    """ARTS sends args, env and channels as strings: Python reprs such as
    "['a1', 'b 2']" (read with `ast.literal_eval`, which evaluates literals only,
    never code), or JSON. A string that is neither stays a string."""
    if not isinstance(value, str) or len(value) > 65536:
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return value


def _words_list(value: Any) -> Any:
    """`['']`, ARTS' way of saying "none", is an empty list."""
    if isinstance(value, (list, tuple)):
        return [v for v in value if v != ""]
    return value


def confined(module_dir: Path, name: Any, what: str, want_dir: bool = False, must_exist: bool = True) -> Path:
    """`name` resolved in the module directory, never outside it."""
    if not isinstance(name, str) or not name:
        raise ControlError(f"{what} must be a non-empty string")
    if "\0" in name:
        raise ControlError(f"{what} {short(name, 60)!r} holds a NUL character")
    path = (module_dir / name).resolve()
    if not path.is_relative_to(module_dir):
        raise ControlError(f"{what} {name!r} leaves the module directory")
    if not must_exist:
        return path
    if want_dir and not path.is_dir():
        raise ControlError(f"{what} {name!r} is not a directory in the module directory")
    if not want_dir and not path.is_file():
        raise ControlError(f"{what} {name!r} not found in the module directory")
    return path


def topic_level(value: Any, what: str) -> str:
    """`value` as one level of a topic (a module's stdio topic, a runtime's control topic)."""
    if not isinstance(value, str) or not value:
        raise ControlError(f"{what} is missing")
    problem = topic_name_problem(value) or ("holds '/'" if "/" in value else None)
    if problem:
        raise ControlError(f"{what} {short(value, 60)!r} cannot be part of a topic: it {problem}")
    return value


MAX_CHANNELS = 32


def parse_channels(value: Any, realm: str, prefix: str | None) -> list[Channel]:
    """A create's `channels`, in either dialect: Silverline's `{"path", "mode", "topic"}`,
    ARTS' `{"path", "type": "pubsub", "mode", "params": {"topic"}}` (or its repr
    string). A topic is a topic name (no wildcards) under `prefix` (default the
    realm's), never under the protocol's own `{realm}/proc/` or `{realm}/rm/`."""
    value = _words_list(_decode_maybe(value))
    if value in (None, "", []):
        return []
    if not isinstance(value, list):
        raise ControlError(f"'channels' must be a list, got {short(value, 60)}")
    if len(value) > MAX_CHANNELS:
        raise ControlError(f"a module may have at most {MAX_CHANNELS} channels, got {len(value)}")
    allowed = f"{realm}/" if prefix is None else prefix
    channels: dict[str, Channel] = {}
    for i, ch in enumerate(value):
        what = f"channels[{i}]"
        if not isinstance(ch, dict):
            raise ControlError(f"{what} must be an object with path, mode and topic, got {short(ch, 60)}")
        path = ch.get("path")
        if not isinstance(path, str) or not path or len(path) > 255 or "\0" in path:
            raise ControlError(f"{what}: 'path' must be a non-empty string of at most 255 characters")
        what = f"channel {short(path, 40)!r}"
        if path in channels:
            raise ControlError(f"{what} is given twice")
        if ch.get("type", "pubsub") != "pubsub":
            raise ControlError(f"{what}: type {short(ch.get('type'), 30)!r} is not supported here (only pubsub)")
        mode = ch.get("mode", "rw")
        if mode not in ("r", "w", "rw"):
            raise ControlError(f"{what}: 'mode' must be r, w or rw, got {short(mode, 30)!r}")
        params = ch.get("params") if isinstance(ch.get("params"), dict) else {}
        topic = ch.get("topic", params.get("topic"))
        if not isinstance(topic, str) or not topic:
            raise ControlError(f"{what}: 'topic' is missing")
        problem = topic_name_problem(topic) or ("holds a wildcard (+ or #)" if "+" in topic or "#" in topic else None)
        if problem:
            raise ControlError(f"{what}: topic {short(topic, 60)!r} cannot be used: it {problem}")
        if topic.startswith((f"{realm}/proc/", f"{realm}/rm/")):
            raise ControlError(f"{what}: topic {short(topic, 60)!r} is the orchestrator protocol's own")
        if not topic.startswith(allowed):
            raise ControlError(f"{what}: topic {short(topic, 60)!r} is outside {allowed!r} "
                               "(runtime.conf orchestrator.channel_prefix allows others)")
        channels[path] = Channel(path, topic, mode)
    return list(channels.values())


def parse_create(data: dict[str, Any], module_dir: Path, realm: str = "realm",
                 channel_prefix: str | None = None, file_needed: bool = True) -> ModuleSpec:
    """`file_needed=False`: the module's bytes come with it (a move), the file need not be here."""
    module_id = topic_level(data.get("uuid"), "module 'uuid'")
    file = data.get("file", data.get("filename"))
    if file is None:
        raise ControlError("module 'file' is missing")
    path = confined(module_dir, file, "file", must_exist=file_needed)
    args = _words_list(_decode_maybe(data.get("args")))
    if args is None or args == [] or args == "":
        args = {}
    if isinstance(args, str):
        args = {"argv": _words(args, "'args'")}
    if isinstance(args, list):  # ARTS: the arguments themselves
        args = {"argv": args}
    if not isinstance(args, dict):
        raise ControlError(f"'args' must be an object, got {short(args, 60)}")
    engine = args.get("engine", "wasmtime")
    if engine not in ("wasmtime", "", None):
        raise ControlError(f"engine {engine!r} is not available here (this runtime has wasmtime)")
    argv = _words_list(_decode_maybe(args.get("argv", [])))
    if isinstance(argv, str):
        argv = _words(argv, "'args.argv'")
    if not isinstance(argv, list) or not all(isinstance(a, (str, int, float)) for a in argv):
        raise ControlError("'args.argv' must be a list of strings")
    env = _words_list(_decode_maybe(args.get("env", data.get("env", []))))
    if isinstance(env, str):
        env = env.split()
    if isinstance(env, dict):
        env = [f"{k}={v}" for k, v in env.items()]
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise ControlError("'args.env' must be a list of \"K=V\" strings")
    dirs = args.get("dirs", []) or []
    if not isinstance(dirs, list):
        raise ControlError("'args.dirs' must be a list of directories")
    preopens = [(str(confined(module_dir, d, "directory", want_dir=True)), d) for d in dirs]
    repeat = args.get("repeat", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 0 <= repeat <= MAX_REPEAT:
        raise ControlError(f"'args.repeat' must be a whole number from 0 to {MAX_REPEAT}")
    limit = args.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit)
                              or not 0 < limit <= MAX_LIMIT_S):
        raise ControlError(f"'args.limit' must be a number of seconds greater than 0 and at most {MAX_LIMIT_S}, "
                           f"got {short(limit, 30)}")
    fault = args.get("fault_crash", "ignore") or "ignore"
    if fault not in ("ignore", "restart"):
        raise ControlError("'args.fault_crash' must be ignore or restart")
    channels = parse_channels(data.get("channels"), realm, channel_prefix)
    migratable = args.get("migratable", True)
    if not isinstance(migratable, bool):
        raise ControlError("'args.migratable' must be true or false")
    every = args.get("checkpoint_s")
    if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float)) or not math.isfinite(every)
                              or not (every == 0 or 0.1 <= every <= MAX_LIMIT_S)):
        raise ControlError(f"'args.checkpoint_s' must be 0 (none) or a number of seconds from 0.1 to {MAX_LIMIT_S}")
    return ModuleSpec(
        uuid=module_id, name=str(data.get("name") or path.stem), path=path, argv=[str(a) for a in argv],
        env=dict(e.split("=", 1) for e in env), dirs=preopens, repeat=max(1, repeat),
        limit_s=float(limit) if limit else None, fault_crash=fault, channels=channels,
        migratable=migratable, checkpoint_s=None if every is None else float(every),
    )
