"""`serve --processes N`: N worker processes of one node, supervised.

Each worker is a whole node process (`serve --worker K/N`) with its own event
loop, client id (`<client id>-w<K>`) and fork-safe request ids. The workers
take requests from one shared MQTT subscription (`$share/<mqtt.shared_group,
default rm-<node id>>/<topic>`) and accept REST connections on one port
(`SO_REUSEPORT`: the kernel spreads connections over them). The first worker
also runs the orchestrator runtime and publishes the node's status, with the
load of every worker (from a small shared file, `worker_loads.py`).

The supervisor only starts, watches and stops: a worker that dies is started
again with the same index, so with the same client id and MQTT session (the
broker keeps the requests it had taken and not acknowledged, and hands them to
it when it is back). SIGTERM or Ctrl-C stops every worker (each drains as a
node does); a second signal kills them. SIGHUP is passed on: each worker
reloads its configuration.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cluster.worker_loads import create_file, heartbeats
from .sd_notify import notify

log = logging.getLogger("supervisor")
RESTART_BACKOFF_S = (0.2, 1.0, 5.0)  # a worker that keeps dying is restarted more slowly
# A process dies of SIGHUP until its interpreter reaches the node's `main`: a worker
# younger than this gets the supervisor's SIGHUP once it is this old (it reloads then).
HANGUP_GRACE_S = 3.0
# A worker stamps its slot of the loads file every 0.5 s from its event loop
# (observe/loop_watch.py). One whose stamp is older than SILENT_S (stopped with
# SIGSTOP, a wedged loop, a frozen VM) is killed and started again: it takes its
# MQTT session back, and what it held is answered. A worker has START_GRACE_S
# to start (until its first beat) before its silence counts.
SILENT_S = 5.0
START_GRACE_S = 15.0
LOADS_PREFIX = "rm-workers-"


def run_workers(processes: int, worker_argv: list[str], drain_timeout_s: float) -> int:
    """Run `processes` workers until a signal; returns the exit code."""
    _remove_left_behind()
    loads = Path(tempfile.mkdtemp(prefix=f"{LOADS_PREFIX}{os.getpid()}-")) / "loads"
    create_file(loads, processes)
    workers: dict[int, subprocess.Popen] = {}
    started_at: dict[int, float] = {}
    hangups: set[int] = set()  # workers owed a SIGHUP once they are old enough
    deaths: dict[int, list[float]] = {}
    stop_signals: list[int] = []

    def start(k: int) -> None:
        cmd = [sys.executable, "-m", "runtime_manager", "serve", *worker_argv, "--worker", f"{k}/{processes}",
               "--worker-loads", str(loads)]
        # own process group: a Ctrl-C in the terminal reaches the supervisor only,
        # which stops the workers; a worker ends with its supervisor, however that ends
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}  # the supervisor speaks to systemd
        workers[k] = subprocess.Popen(cmd, process_group=0, preexec_fn=_end_with_parent, env=env)
        started_at[k] = time.monotonic()
        log.info("worker %d started (pid %d)", k, workers[k].pid)

    def on_signal(sig: int, _frame: object) -> None:
        stop_signals.append(sig)
        if len(stop_signals) == 1:
            notify("STOPPING=1")
            log.info("%s received, stopping %d workers", signal.Signals(sig).name, len(workers))
            for proc in workers.values():
                _send(proc, signal.SIGTERM)
        else:
            log.warning("signal received again: killing the workers")
            for proc in workers.values():
                _send(proc, signal.SIGKILL)

    def on_hangup(_sig: int, _frame: object) -> None:
        log.info("SIGHUP received: every worker reads its configuration again")
        hangups.update(workers)  # sent from the loop below, to each worker old enough to take it

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    for k in range(processes):
        start(k)
    notify("READY=1", f"STATUS={processes} workers")
    restart_at: dict[int, float] = {}
    while not stop_signals:
        time.sleep(0.1)
        now = time.monotonic()
        for k in [k for k in hangups if now - started_at.get(k, 0.0) >= HANGUP_GRACE_S]:
            hangups.discard(k)
            _send(workers[k], signal.SIGHUP)
        beats = heartbeats(loads, processes)
        for k, proc in workers.items():
            began = started_at.get(k, 0.0)
            # its own beats once it has written one; until then, START_GRACE_S to start
            last = beats[k] if beats[k] >= began else began + START_GRACE_S - SILENT_S
            if proc.poll() is None and now - last > SILENT_S:
                log.error("worker %d (pid %d) silent for %.1f s (stopped or wedged): killed, to be started again",
                          k, proc.pid, now - last)
                _send(proc, signal.SIGKILL)
        for k, proc in list(workers.items()):
            if proc.poll() is None or stop_signals:
                continue
            if k not in restart_at:
                recent = [t for t in deaths.setdefault(k, []) if now - t < 60]
                deaths[k] = [*recent, now]
                delay = RESTART_BACKOFF_S[min(len(recent), len(RESTART_BACKOFF_S) - 1)]
                log.warning("worker %d (pid %d) ended with code %s; starting it again in %.1f s",
                            k, proc.pid, proc.returncode, delay)
                restart_at[k] = now + delay
            elif now >= restart_at[k]:
                del restart_at[k]
                start(k)
    deadline = time.monotonic() + drain_timeout_s + 15
    for proc in workers.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop in time; killed", proc.pid)
            _send(proc, signal.SIGKILL)
            proc.wait(5)
    codes = [proc.returncode for proc in workers.values()]
    log.info("all workers stopped (exit codes %s)", codes)
    loads.unlink(missing_ok=True)
    loads.parent.rmdir()
    return 0 if all(c == 0 for c in codes) and len(stop_signals) == 1 else 1


def _remove_left_behind() -> None:
    """The load files of supervisors that were killed (SIGKILL leaves them behind)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{LOADS_PREFIX}*"):
        try:
            pid = int(folder.name[len(LOADS_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not Path(f"/proc/{pid}").exists():
            try:
                for f in folder.iterdir():
                    f.unlink(missing_ok=True)
                folder.rmdir()
            except OSError as exc:  # another's, or in use: left alone
                log.debug("could not remove %s: %s", folder, exc)


def _end_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the supervisor dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _send(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
