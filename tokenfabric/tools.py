"""Where the external tools live: PATH first, then the /opt/p4 prefix."""

from __future__ import annotations

import os
import random
import shutil
import socket
from pathlib import Path

P4_PREFIX = Path(os.environ.get("TOKENFABRIC_P4_PREFIX", "/opt/p4"))


def find_tool(name: str) -> str | None:
    """Return the absolute path of `name`, or None where it is not installed."""
    found = shutil.which(name)
    if found:
        return found
    candidate = P4_PREFIX / "bin" / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return None


def tool_env() -> dict[str, str]:
    """The environment to run BMv2 and p4c with: /opt/p4 on PATH and the loader path."""
    env = dict(os.environ)
    if (P4_PREFIX / "bin").is_dir():
        env["PATH"] = f"{P4_PREFIX / 'bin'}:{env.get('PATH', '')}"
        lib = str(P4_PREFIX / "lib")
        env["LD_LIBRARY_PATH"] = f"{lib}:{env['LD_LIBRARY_PATH']}" if env.get(
            "LD_LIBRARY_PATH") else lib
    return env


_HANDED_OUT: set[int] = set()
# below Linux's default ephemeral range (32768-60999): an outgoing connection's local port
# never lands here, so a port chosen now is still free when a switch binds it seconds later
LISTEN_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing holds right now, outside the ephemeral range,
    and that this process has not handed out before (the lab picks every switch's ports
    before it starts any of them)."""
    for _ in range(200):
        port = random.choice(LISTEN_PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # held by someone
        _HANDED_OUT.add(port)
        return port
    raise OSError(f"no free TCP port on 127.0.0.1 in {LISTEN_PORTS.start}.."
                  f"{LISTEN_PORTS.stop - 1}")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0
