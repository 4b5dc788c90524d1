"""Readiness for service managers: the systemd notify protocol (`Type=notify`).

When systemd starts the node with `NOTIFY_SOCKET` set, the node says `READY=1`
once every part has started (so `systemctl start` returns when the node takes
requests, and units ordered after it start then), `RELOADING=1` and `READY=1`
around a reload, and `STOPPING=1` when it begins to drain. Without
`NOTIFY_SOCKET` nothing is sent. Sending never raises: a service manager that
went away does not stop the node.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("node")


def notify(*fields: str) -> bool:
    """Send `fields` ("READY=1", "STATUS=...") to the service manager; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        return True
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def reloading() -> bool:
    """`RELOADING=1` with the monotonic time systemd asks for (systemd 253's notify-reload)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
