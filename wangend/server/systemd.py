"""systemd integration, written here rather than pulled in: readiness and status
(`sd_notify`), the watchdog, socket activation, and the unit files `wangend install-units`
writes.

    Notifier.from_env()    a datagram per message to $NOTIFY_SOCKET (a leading `@` is the
                           abstract namespace); UTF-8, so a STATUS= with any text arrives
                           whole; every method is a no-op when the variable is unset
    listen_sockets()       the sockets systemd passed (LISTEN_FDS from fd 3, LISTEN_PID
                           must be ours), named by LISTEN_FDNAMES; the variables are unset
    render_units()         wangend.service, wangend.socket and wangend-user.service with
                           ExecStart pointing at a real `wangend`
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = [
    "Notifier",
    "find_wangend",
    "listen_sockets",
    "render_units",
    "watchdog_interval",
]

log = logging.getLogger("wangend")

LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """Sends sd_notify messages; silent when there is no $NOTIFY_SOCKET."""

    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        if address:
            # "@name" is Linux's abstract namespace: a leading NUL byte, no file.
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; False if it could not be sent.

        Never blocks: the daemon calls this on its event loop, and a blocking send to a
        notify socket whose reader has stalled (its queue holds only
        net.unix.max_dgram_qlen datagrams, 10 on some kernels) would freeze every client.
        A full queue drops the message; the next status or watchdog ping follows soon.
        """
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(message, self.address)
        except BlockingIOError:
            log.debug("sd_notify queue at %r is full; dropped %s", self.address, fields[0])
            return False
        except OSError as exc:  # systemd went away, or the socket is wrong: log, go on
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def watchdog_interval(env: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when systemd
    does not watch this process."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


def listen_sockets(env: MutableMapping[str, str] | None = None) -> list[socket.socket] | None:
    """The listening sockets systemd handed over, or None when not socket-activated.

    LISTEN_PID must name this process (the variables may have been inherited by
    accident). The LISTEN_* variables are removed either way, so a child never takes the
    sockets for its own.
    """
    env = os.environ if env is None else env
    pid, count, names = (env.pop(var, None) for var in _LISTEN_VARS)
    if count is None:
        return None
    if pid is not None and pid != str(os.getpid()):
        log.warning("LISTEN_FDS was meant for pid %s, not this process; ignoring it", pid)
        return None
    try:
        n = int(count)
    except ValueError:
        log.warning("LISTEN_FDS=%r is not a number; ignoring it", count)
        return None
    labels = names.split(":") if names else []
    sockets = []
    for i, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + n)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
        label = labels[i] if i < len(labels) else "unknown"
        log.debug("socket activation: fd %d (%s) %s", fd, label, sock.getsockname())
        sockets.append(sock)
    return sockets


# --- unit files ---------------------------------------------------------------------------

_SERVICE = """\
# wangend as a system service, run as the dedicated user `wangend`:
#   useradd --system --home-dir /var/lib/wangend --groups video,render wangend
#   wangend install-units && systemctl daemon-reload
#   systemctl enable --now wangend.socket wangend.service
# See docs/operations.md.
[Unit]
Description=wangend: Wan video generation daemon
After=network.target nvidia-persistenced.service

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec} serve --state-dir /var/lib/wangend --output-dir /var/lib/wangend/outputs
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM lets the running step end, writes its resume point and puts the job back in
# the queue (after stop_grace, if set); another one hurries that along and still exits
# 0; only a signal after that exits at once with 1 (docs/operations.md).
KillSignal=SIGTERM
TimeoutStartSec=120
TimeoutStopSec=60
WatchdogSec=30
Restart=on-failure
RestartSec=5
RestartPreventExitStatus=2
User=wangend
Group=wangend
SupplementaryGroups=video render
StateDirectory=wangend
StateDirectoryMode=0750
CacheDirectory=wangend
RuntimeDirectory=wangend
RuntimeDirectoryPreserve=yes
Environment=PYTHONUNBUFFERED=1 HOME=/var/lib/wangend XDG_CACHE_HOME=/var/cache/wangend
UMask=0027

# Hardening that still lets CUDA work. No PrivateDevices= (it hides /dev/nvidia*), no
# MemoryDenyWriteExecute= (CUDA and Triton generate code at run time). These options
# imply NoNewPrivileges, so the setuid nvidia-modprobe cannot create /dev/nvidia* here:
# the driver's device nodes must exist before the service starts (docs/operations.md).
DevicePolicy=closed
DeviceAllow=char-nvidia* rw
DeviceAllow=/dev/nvidiactl rw
DeviceAllow=/dev/nvidia-uvm rw
DeviceAllow=/dev/nvidia-uvm-tools rw
# /dev/dri/* (render nodes), for ROCm or Intel GPUs
DeviceAllow=char-drm rw
ProtectSystem=strict
ReadWritePaths=/var/lib/wangend /var/cache/wangend
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
Also=wangend.socket
"""

_SOCKET = """\
# Socket activation for wangend.service: systemd owns the listeners, so clients can
# connect while the daemon (re)starts. The service then binds nothing itself.
# Unix socket clients: WANGEN_URL=unix:///run/wangend/wangend.sock (group wangend).
[Unit]
Description=wangend: Wan video generation daemon (sockets)

[Socket]
ListenStream=127.0.0.1:7870
ListenStream=/run/wangend/wangend.sock
FileDescriptorName=wangend
SocketUser=wangend
SocketGroup=wangend
SocketMode=0660
DirectoryMode=0755
Service=wangend.service

[Install]
WantedBy=sockets.target
"""

_USER_SERVICE = """\
# wangend as a per-user service (the GPU belongs to the logged-in user):
#   wangend install-units --user
#   systemctl --user daemon-reload && systemctl --user enable --now wangend
#   loginctl enable-linger $USER   # keep it running after logout
# No sandboxing options: in a user manager they need unprivileged user namespaces.
[Unit]
Description=wangend: Wan video generation daemon

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec} serve
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM lets the running step end, writes its resume point and puts the job back in
# the queue (after stop_grace, if set); another one hurries that along and still exits
# 0; only a signal after that exits at once with 1 (docs/operations.md).
KillSignal=SIGTERM
TimeoutStartSec=120
TimeoutStopSec=60
WatchdogSec=30
Restart=on-failure
RestartSec=5
RestartPreventExitStatus=2
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=default.target
"""


def render_units(wangend: str, *, user: bool = False) -> dict[str, str]:
    """File name -> text of the units for a system (`user=False`) or user manager."""
    if user:
        return {"wangend.service": _USER_SERVICE.format(exec=wangend)}
    return {"wangend.service": _SERVICE.format(exec=wangend), "wangend.socket": _SOCKET}


def find_wangend() -> str:
    """The absolute path of the `wangend` executable running now (or on PATH)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "wangend" and argv0.exists():
        return str(argv0.absolute())
    beside = Path(sys.executable).parent / "wangend"  # the venv's own script
    if beside.exists():
        return str(beside)
    found = shutil.which("wangend")
    if found:
        return str(Path(found).absolute())
    raise FileNotFoundError("cannot find the wangend executable; pass --exec PATH")
