"""sd_notify in a few lines: tell the service manager (systemd ``Type=notify``) how we are doing.

Protocol (``sd_notify(3)``): when ``NOTIFY_SOCKET`` is set, send newline-separated ``KEY=VALUE``
assignments as one datagram to that AF_UNIX socket. A path starting with ``@`` names a socket in
the abstract namespace. Without the variable this does nothing, so callers need no condition.

Who notifies: only a process the service manager started and watches (a ``--foreground`` mount,
``mount-all --foreground``). Background mount daemons are forks, not the unit's main process; they
never send anything (``daemon`` forks them and they take no part in this).

A failure to notify is logged at debug level and otherwise ignored: the mount works either way,
and systemd reports a unit that never became ready on its own (``TimeoutStartSec``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV_VAR = "NOTIFY_SOCKET"


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``assignments`` (e.g. ``"READY=1"``); True if a datagram was sent."""
    address = _address((os.environ if environ is None else environ).get(ENV_VAR, ""))
    if address is None:
        return False
    message = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.debug("cannot notify the service manager at %s: %s", address, exc)
        return False
    return True


def _address(value: str) -> str | None:
    """The socket address ``NOTIFY_SOCKET`` names, or None if unset or of an unsupported kind."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a vsock address (systemd >= 253), which we do not speak
