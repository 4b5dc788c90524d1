"""`fleet <command> -f FLEET.yaml`: configure, start, status, stop, kill, clean,
cmd, put, get, run, version and logs, on every host of a fleet at once (or the
`--host` ones). Each prints what happens per host as it happens, then a summary,
and exits non-zero when any host failed, naming it and why; the others go on.

On each host, under its `root`: `config/`, `modules/`, `state/`, `logs/node.log`
and `node.pid` (the node runs detached, in a session of its own, started with
RM_CONFIG_DIR naming its config directory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh

from ..core.errors import ConfigError
from ..core.topics import status_topic
from .remote import HostError, Statuses, each, env_prefix, run, tar_of
from .render import check, render
from .spec import Fleet, FleetHost, load_fleet

Say = Callable[[str], None]


def _say(line: str) -> None:
    print(line, flush=True)


def _prefix(fleet: Fleet) -> Callable[[FleetHost], str]:
    width = max(len(h.address) for h in fleet.hosts)
    return lambda h: f"{h.address:<{width}}  node {h.node_id:<4}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


# ----- configure --------------------------------------------------------------------------------
def configure(fleet: Fleet, hosts: list[FleetHost], staging: Path, say: Say = _say,
              show: bool = False) -> dict[str, str | None]:
    """Render every host's directory under `staging` and check it here: None, or the problems, by address."""
    name = _prefix(fleet)
    problems: dict[str, str | None] = {}
    for host in hosts:
        config = render(fleet, host, staging / host.address)
        errors = check(config)
        problems[host.address] = "; ".join(errors) if errors else None
        say(f"{name(host)}  {'configured' if not errors else 'check failed: ' + problems[host.address]}")  # type: ignore[operator]
        if show:
            for file in sorted(config.iterdir()):
                say(f"  --- {file.name}\n" + "\n".join("    " + line for line in file.read_text().splitlines()))
    return problems


# ----- start ------------------------------------------------------------------------------------
def _launch(fleet: Fleet, host: FleetHost) -> str:
    """Start the node detached unless it runs; prints `running <pid>` or `started <pid>`."""
    root = shlex.quote(fleet.root_of(host))
    first = shlex.split(fleet.command)[0]
    return (f"cd {root} && mkdir -p logs state && "
            f"if [ -f node.pid ] && kill -0 $(cat node.pid) 2>/dev/null; then echo running $(cat node.pid); exit 0; fi; "
            f"command -v {shlex.quote(first)} >/dev/null 2>&1 || {{ echo 'command not found on the host: {first}' >&2; exit 127; }}; "
            f"{env_prefix(fleet, host)} setsid {fleet.command} serve >> logs/node.log 2>&1 < /dev/null & "
            f"echo $! > node.pid; echo started $!")


async def _start_one(fleet: Fleet, host: FleetHost, conn: asyncssh.SSHClientConnection, staging: Path,
                     say: Say) -> int:
    """The node's pid, once it runs (it may have run already)."""
    name = _prefix(fleet)(host)
    root = shlex.quote(fleet.root_of(host))
    code, out, _ = await run(conn, f"cd {root} 2>/dev/null && [ -f node.pid ] && kill -0 $(cat node.pid) 2>/dev/null "
                                   f"&& cat node.pid")
    if code == 0 and out.strip().isdigit():
        say(f"{name}  already running (pid {out.strip()})")
        return int(out.strip())
    say(f"{name}  connected; copying its configuration and modules")
    code, _, err = await run(conn, f"mkdir -p {root} && rm -rf {root}/config {root}/modules && tar -xzf - -C {root}",
                             input=tar_of(staging / host.address, ["config", "modules"]))
    if code != 0:
        raise HostError(f"cannot write {fleet.root_of(host)}: {err.strip()[:200]}")
    code, out, err = await run(conn, _launch(fleet, host))
    if code != 0:
        raise HostError(err.strip()[:200] or f"the start failed (exit {code})")
    word, _, pid = out.strip().partition(" ")
    say(f"{name}  {word}, pid {pid}")
    return int(pid)


async def _last_words(fleet: Fleet, host: FleetHost, conn: asyncssh.SSHClientConnection) -> str:
    root = shlex.quote(fleet.root_of(host))
    _code, out, _ = await run(conn, f"cd {root} && if kill -0 $(cat node.pid) 2>/dev/null; then echo RUNNING; fi; "
                                   f"tail -n 3 logs/node.log")
    lines = [line for line in out.splitlines() if line.strip()]
    alive = bool(lines) and lines[0] == "RUNNING"
    tail = [line for line in lines if line != "RUNNING"]
    return ("still starting: " if alive else "exited: ") + (tail[-1][:200] if tail else "no log")


async def start(fleet: Fleet, hosts: list[FleetHost], say: Say = _say) -> int:
    name = _prefix(fleet)
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=f"fleet-{fleet.name}-") as tmp:
        problems = configure(fleet, hosts, Path(tmp), say)
        failed.update({a: f"check failed: {p}" for a, p in problems.items() if p})
        todo = [h for h in hosts if h.address not in failed]
        statuses = Statuses(fleet)
        try:
            began = time.monotonic()
            outcomes = await each(fleet, todo, lambda h, c: _start_one(fleet, h, c, Path(tmp), say))
            pids = {a: o for a, o in outcomes.items() if isinstance(o, int)}
            for address, outcome in outcomes.items():
                if isinstance(outcome, HostError):
                    failed[address] = str(outcome)
                    say(f"{name(next(h for h in hosts if h.address == address))}  failed: {outcome}")
            waiting = [h for h in todo if h.address not in failed]
            ready: dict[str, float] = {}
            deadline = time.monotonic() + fleet.ready_timeout_s
            looked = time.monotonic()
            while waiting and time.monotonic() < deadline:
                if time.monotonic() - looked > 2:  # a node that exited (a port in use, say) fails now, not at the deadline
                    looked = time.monotonic()
                    words = await each(fleet, waiting, lambda h, c: _last_words(fleet, h, c))
                    for host in list(waiting):
                        why = words[host.address]
                        if isinstance(why, str) and why.startswith("exited"):
                            failed[host.address] = f"not ready: {why}"
                            waiting.remove(host)
                            say(f"{name(host)}  failed: {failed[host.address]}")
                for host in list(waiting):
                    # ready, and said by this process (not a status retained from before)
                    if statuses.state(host.node_id) == "ready" and statuses.doc(host.node_id).get("pid") == pids[host.address]:
                        ready[host.address] = time.monotonic() - began
                        waiting.remove(host)
                        say(f"{name(host)}  ready ({ready[host.address]:.1f} s)")
                await asyncio.sleep(0.1)
            if waiting:
                words = await each(fleet, waiting, lambda h, c: _last_words(fleet, h, c))
                for host in waiting:
                    why = words[host.address]
                    failed[host.address] = f"not ready within {fleet.ready_timeout_s:g} s ({why})"
                    say(f"{name(host)}  failed: {failed[host.address]}")
            rows = [[h.address, h.node_id, statuses.state(h.node_id), failed.get(h.address, "ok")] for h in hosts]
        finally:
            statuses.close()
    say("\n" + _table(rows, ["host", "node", "broker", "outcome"]))
    if failed:
        say(f"\n{len(failed)} of {len(hosts)} host(s) failed: " + ", ".join(sorted(failed)))
    return 1 if failed else 0


# ----- status -----------------------------------------------------------------------------------
async def _process(fleet: Fleet, host: FleetHost, conn: asyncssh.SSHClientConnection) -> dict[str, Any]:
    root = shlex.quote(fleet.root_of(host))
    _code, out, _ = await run(conn, f"cd {root} 2>/dev/null || {{ echo absent; exit 0; }}; "
                                   f"[ -f node.pid ] || {{ echo stopped; exit 0; }}; p=$(cat node.pid); "
                                   f"if kill -0 $p 2>/dev/null; then echo running $p $(ps -o etimes= -p $p); "
                                   f"else echo stopped; fi")
    words = out.split()
    if words[:1] == ["running"]:
        return {"process": "running", "pid": int(words[1]), "uptime_s": int(words[2]) if len(words) > 2 else None}
    return {"process": words[0] if words else "unknown", "pid": None, "uptime_s": None}


def _realm(fleet: Fleet) -> str | None:
    """The template's orchestrator realm, when its nodes run orchestrator runtimes."""
    try:
        orch = json.loads((fleet.template / "runtime.conf").read_text()).get("orchestrator")
    except (OSError, ValueError, AttributeError):
        return None
    return str(orch.get("realm", "realm")) if isinstance(orch, dict) else None


async def status(fleet: Fleet, hosts: list[FleetHost], as_json: bool = False, say: Say = _say) -> int:
    statuses = Statuses(fleet, realm=_realm(fleet))
    try:
        procs = await each(fleet, hosts, lambda h, c: _process(fleet, h, c))
        rows, docs = [], []
        for host in hosts:
            proc = procs[host.address]
            doc = statuses.doc(host.node_id)
            entry = {"host": host.address, "node": host.node_id, "broker": statuses.state(host.node_id),
                     **({"process": "no ssh", "error": str(proc), "pid": None, "uptime_s": None}
                        if isinstance(proc, HostError) else proc),
                     "version": doc.get("version"), "in_flight": doc.get("in_flight"), "load": doc.get("load"),
                     "flows": doc.get("flows"), "modules": statuses.modules(host.name)}
            docs.append(entry)
            rows.append([host.address, host.node_id, entry["broker"], entry["process"], str(entry["pid"] or "-"),
                         f"{entry['uptime_s']} s" if entry["uptime_s"] is not None else "-", str(entry["version"] or "-"),
                         str(entry["in_flight"] if entry["in_flight"] is not None else "-"),
                         str(entry["load"] if entry["load"] is not None else "-"),
                         "-" if entry["modules"] is None else ", ".join(entry["modules"]) or "none"])
    finally:
        statuses.close()
    if as_json:
        say(json.dumps(docs, indent=2))
    else:
        say(_table(rows, ["host", "node", "broker", "process", "pid", "uptime", "version", "in flight", "load",
                          "modules"]))
        for entry in docs:
            if "error" in entry:
                say(f"{entry['host']}: {entry['error']}")
    return 1 if any(isinstance(p, HostError) for p in procs.values()) else 0


# ----- stop, kill, clean ------------------------------------------------------------------------
async def _signal(fleet: Fleet, host: FleetHost, conn: asyncssh.SSHClientConnection, sig: str,
                  wait_s: float) -> str:
    root = shlex.quote(fleet.root_of(host))
    code, out, _ = await run(conn, f"cd {root} 2>/dev/null && [ -f node.pid ] && p=$(cat node.pid) && "
                                   f"kill -0 $p 2>/dev/null && kill -{sig} $p && echo $p")
    if code != 0 or not out.strip():
        return "not running"
    pid = out.strip()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        code, _, _ = await run(conn, f"kill -0 {pid} 2>/dev/null")
        if code != 0:
            await run(conn, f"rm -f {root}/node.pid")
            return f"stopped (pid {pid})" if sig == "TERM" else f"killed (pid {pid})"
        await asyncio.sleep(0.2)
    if sig == "TERM":
        await run(conn, f"kill -KILL {pid} 2>/dev/null; rm -f {root}/node.pid")
        return f"killed after {wait_s:g} s without stopping (pid {pid})"
    return f"still there after SIGKILL (pid {pid})"


async def stop(fleet: Fleet, hosts: list[FleetHost], sig: str = "TERM", say: Say = _say) -> int:
    name = _prefix(fleet)
    wait_s = 5.0 if sig == "KILL" else max(float(h.settings.get("drain_timeout_s", 10)) for h in hosts) + 5
    outcomes = await each(fleet, hosts, lambda h, c: _signal(fleet, h, c, sig, wait_s))
    for host in hosts:
        outcome = outcomes[host.address]
        say(f"{name(host)}  {'failed: ' if isinstance(outcome, HostError) else ''}{outcome}")
    return 1 if any(isinstance(o, HostError) for o in outcomes.values()) else 0


async def _clean_one(fleet: Fleet, host: FleetHost, conn: asyncssh.SSHClientConnection) -> list[str]:
    root = shlex.quote(fleet.root_of(host))
    code, out, _ = await run(conn, f"cd {root} 2>/dev/null || exit 0; [ -f node.pid ] && kill -0 $(cat node.pid) "
                                   f"2>/dev/null && echo RUNNING; cat state/*.json 2>/dev/null; cat config/runtime.conf")
    if out.startswith("RUNNING"):
        raise HostError("the node runs: stop it first")
    prefix, group, realm, runtime = "rm/nodes", "", "realm", None
    for chunk in out.replace("}\n{", "}\n\n{").split("\n\n"):
        try:
            doc = json.loads(chunk)
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        prefix = str(doc.get("status_prefix", prefix))
        group = str(doc.get("group", group))
        if isinstance(doc.get("orchestrator"), dict):
            realm = str(doc["orchestrator"].get("realm", realm))
        if isinstance(doc.get("runtime_uuid"), str):
            runtime = doc["runtime_uuid"]
    retained = [status_topic(prefix, host.node_id, group)] + ([f"{realm}/rm/presence/{runtime}"] if runtime else [])
    code, _, err = await run(conn, f"rm -rf {root}")
    if code != 0:
        raise HostError(f"cannot remove {fleet.root_of(host)}: {err.strip()[:200]}")
    return retained


async def clean(fleet: Fleet, hosts: list[FleetHost], say: Say = _say) -> int:
    name = _prefix(fleet)
    outcomes = await each(fleet, hosts, lambda h, c: _clean_one(fleet, h, c))
    statuses = Statuses(fleet)
    try:
        for host in hosts:
            outcome = outcomes[host.address]
            if isinstance(outcome, HostError):
                say(f"{name(host)}  failed: {outcome}")
                continue
            statuses.clear(outcome)
            say(f"{name(host)}  removed {fleet.root_of(host)}; cleared {', '.join(outcome)}")
    finally:
        statuses.close()
    return 1 if any(isinstance(o, HostError) for o in outcomes.values()) else 0


# ----- cmd, run, version, logs, put, get --------------------------------------------------------------
async def shell(fleet: Fleet, hosts: list[FleetHost], command: Callable[[FleetHost], str], say: Say = _say,
                timeout: float = 600) -> int:
    """`command(host)` on each host; each output line prefixed by its host."""
    name = _prefix(fleet)

    async def one(host: FleetHost, conn: asyncssh.SSHClientConnection) -> int:
        code, out, err = await run(conn, command(host), timeout=timeout)
        for line in (out + err).splitlines():
            say(f"{name(host)}  {line}")
        if code != 0:
            say(f"{name(host)}  (exit {code})")
        return code

    outcomes = await each(fleet, hosts, one)
    for host in hosts:
        if isinstance(outcomes[host.address], HostError):
            say(f"{name(host)}  failed: {outcomes[host.address]}")
    return 0 if all(o == 0 for o in outcomes.values()) else 1


async def put(fleet: Fleet, hosts: list[FleetHost], source: Path, dest: str, say: Say = _say) -> int:
    data = tar_of(source.parent, [source.name])

    async def one(host: FleetHost, conn: asyncssh.SSHClientConnection) -> str:
        where = f"{fleet.root_of(host)}/{dest}".rstrip("/")
        code, _, err = await run(conn, f"mkdir -p {shlex.quote(where)} && tar -xzf - -C {shlex.quote(where)}", input=data)
        if code != 0:
            raise HostError(err.strip()[:200])
        return f"{source.name} -> {where}/{source.name}"

    return _report(fleet, hosts, await each(fleet, hosts, one), say)


async def get(fleet: Fleet, hosts: list[FleetHost], path: str, dest: Path, say: Say = _say) -> int:
    async def one(host: FleetHost, conn: asyncssh.SSHClientConnection) -> str:
        where = f"{fleet.root_of(host)}/{path}"
        parent, leaf = where.rsplit("/", 1)
        code, out, err = await conn_tar(conn, parent, leaf)
        if code != 0:
            raise HostError(err.strip()[:200] or f"cannot read {where}")
        target = dest / host.address
        target.mkdir(parents=True, exist_ok=True)
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(out), mode="r:gz") as tar:
            tar.extractall(target, filter="data")
        return f"{where} -> {target / leaf}"

    return _report(fleet, hosts, await each(fleet, hosts, one), say)


async def conn_tar(conn: asyncssh.SSHClientConnection, parent: str, leaf: str) -> tuple[int, bytes, str]:
    done = await conn.run(f"tar -czf - -C {shlex.quote(parent)} {shlex.quote(leaf)}", encoding=None, check=False)
    return int(done.exit_status or 0), done.stdout or b"", (done.stderr or b"").decode("utf-8", "replace")


def _report(fleet: Fleet, hosts: list[FleetHost], outcomes: dict[str, Any], say: Say) -> int:
    name = _prefix(fleet)
    for host in hosts:
        outcome = outcomes[host.address]
        say(f"{name(host)}  {'failed: ' if isinstance(outcome, HostError) else ''}{outcome}")
    return 1 if any(isinstance(o, HostError) for o in outcomes.values()) else 0


# ----- the command line ---------------------------------------------------------------------------
COMMANDS = ("configure", "start", "status", "stop", "kill", "clean", "cmd", "put", "get", "run", "version", "logs")


def main(argv: list[str], program: str = "runtime-manager") -> int:
    parser = argparse.ArgumentParser(prog=f"{program} fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("words", nargs="*", help="cmd: the shell command; put: LOCAL [REMOTE_DIR]; get: REMOTE "
                                                 "[LOCAL_DIR]; run: FILE [ARGV...]")
    parser.add_argument("-f", "--file", default="fleet.yaml", help="the fleet file (default fleet.yaml)")
    parser.add_argument("--host", action="append", default=[], help="only this host (address or node id); repeat")
    parser.add_argument("--print", action="store_true", dest="show", help="configure: show each host's files")
    parser.add_argument("--json", action="store_true", help="status: one JSON array")
    parser.add_argument("-n", "--lines", type=int, default=20, help="logs: how many lines")
    args = parser.parse_args(argv)
    try:
        fleet = load_fleet(args.file)
        hosts = fleet.pick(args.host)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 2
    try:
        return asyncio.run(_dispatch(fleet, hosts, args))
    except HostError as exc:
        print(f"fleet {fleet.name}: {exc}", file=sys.stderr)
        return 1


async def _dispatch(fleet: Fleet, hosts: list[FleetHost], args: argparse.Namespace) -> int:
    cmd, words = args.command, args.words
    if cmd == "configure":
        with tempfile.TemporaryDirectory(prefix=f"fleet-{fleet.name}-") as tmp:
            problems = configure(fleet, hosts, Path(tmp), show=args.show)
        return 1 if any(problems.values()) else 0
    if cmd == "start":
        return await start(fleet, hosts)
    if cmd == "status":
        return await status(fleet, hosts, args.json)
    if cmd in ("stop", "kill"):
        return await stop(fleet, hosts, "TERM" if cmd == "stop" else "KILL")
    if cmd == "clean":
        return await clean(fleet, hosts)
    if cmd == "logs":
        return await shell(fleet, hosts, lambda h: f"tail -n {args.lines} {shlex.quote(fleet.root_of(h))}/logs/node.log")
    if cmd == "version":
        return await shell(fleet, hosts, lambda h: f"{env_prefix(fleet, h)} {fleet.command} version")
    if cmd == "cmd":
        if not words:
            raise HostError("cmd needs a shell command")
        line = " ".join(words)
        return await shell(fleet, hosts, lambda h: f"cd {shlex.quote(fleet.root_of(h))} 2>/dev/null; {line}")
    if cmd == "run":
        if not words:
            raise HostError("run needs a module file (in each node's module directory) and its arguments")
        argv = " ".join(shlex.quote(w) for w in words[1:])
        return await shell(fleet, hosts, lambda h: f"{env_prefix(fleet, h)} {fleet.command} run --runtime {h.name} "
                                                   f"--file {shlex.quote(words[0])} --direct"
                                                   + (f" --argv {argv}" if argv else ""))
    if cmd == "put":
        if not words or not Path(words[0]).exists():
            raise HostError("put needs an existing local file or directory")
        return await put(fleet, hosts, Path(words[0]), words[1] if len(words) > 1 else "")
    if not words:
        raise HostError("get needs a path under each host's root")
    return await get(fleet, hosts, words[0], Path(words[1] if len(words) > 1 else "."))
