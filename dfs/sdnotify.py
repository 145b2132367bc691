"""systemd readiness: `READY=1` to $NOTIFY_SOCKET once a process serves (Type=notify units).

A few lines of the sd_notify(3) protocol (one datagram on a unix socket; a leading '@' names
an abstract socket), so no libsystemd is needed. Without the variable (not under systemd)
it does nothing; a failure to send is logged, never fatal: the service still serves.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
ENV = "NOTIFY_SOCKET"


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1\\nSTATUS=...") to systemd; False when nobody listens."""
    address = os.environ.get(ENV)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ.get(ENV), e)
        return False
    return True


def ready(status: str) -> bool:
    """The service is up and serving; `status` is what `systemctl status` shows."""
    return notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")


def stopping() -> bool:
    return notify("STOPPING=1")
