"""Start and stop BMv2's simple_switch_grpc the same way in tests, labs and benchmarks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenfabric.tools import find_tool, free_port, port_open, tool_env

log = logging.getLogger(__name__)


PRIORITY_QUEUES = 8  # queue 0 is the lowest, as in DESIGN.md


class Bmv2Error(RuntimeError):
    """simple_switch_grpc is missing, exited early, or never opened its ports."""


@dataclass
class Bmv2Options:
    ports: dict[int, str]  # switch port -> interface name
    grpc_port: int = field(default_factory=free_port)
    thrift_port: int = field(default_factory=free_port)
    device_id: int = 0
    json_path: Path | None = None  # None: start empty (--no-p4) and wait for P4Runtime
    cpu_port: int | None = None
    priority_queues: int = PRIORITY_QUEUES
    log_path: Path | None = None  # BMv2 writes <log_path>.txt; its stdout goes to <log_path>.out
    log_level: str = "info"
    pcap_dir: Path | None = None
    grpc_host: str = "127.0.0.1"

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    @property
    def log_file(self) -> Path | None:
        return Path(f"{self.log_path}.txt") if self.log_path else None


def command(opts: Bmv2Options) -> list[str]:
    """The simple_switch_grpc command line for `opts`."""
    binary = find_tool("simple_switch_grpc")
    if not binary:
        raise Bmv2Error("simple_switch_grpc not found on PATH or in /opt/p4/bin")
    argv = [binary, "--device-id", str(opts.device_id), "--thrift-port", str(opts.thrift_port)]
    for port, ifname in sorted(opts.ports.items()):
        argv += ["-i", f"{port}@{ifname}"]
    if opts.log_path:
        argv += ["--log-file", str(opts.log_path), "--log-flush", "-L", opts.log_level]
    else:
        # BMv2's level defaults to trace, and it formats every message even into its
        # null sink: that costs token_router most of its packet rate.
        argv += ["-L", "off"]
    if opts.pcap_dir:
        argv += ["--pcap", str(opts.pcap_dir)]
    argv.append(str(opts.json_path) if opts.json_path else "--no-p4")
    argv += ["--", "--grpc-server-addr", opts.grpc_address,
             "--priority-queues", str(opts.priority_queues)]
    if opts.cpu_port is not None:
        argv += ["--cpu-port", str(opts.cpu_port)]
    return argv


class Bmv2Switch:
    """One simple_switch_grpc process, started by us and ended by us by its PID."""

    def __init__(self, opts: Bmv2Options, netns: str | None = None) -> None:
        self.opts = opts
        self.netns = netns
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 20.0) -> Bmv2Switch:
        argv = command(self.opts)
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        out = open(self.opts.log_path.with_suffix(".out"), "wb") if self.opts.log_path \
            else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     env=tool_env(), start_new_session=True)
        if not isinstance(out, int):  # our log file, not DEVNULL
            out.close()
        self.wait_ready(timeout)
        log.info("simple_switch_grpc pid %s on %s", self.proc.pid, self.opts.grpc_address)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait until the gRPC and Thrift ports accept connections."""
        deadline = time.monotonic() + timeout
        host = self.opts.grpc_host
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise Bmv2Error(f"simple_switch_grpc exited with {self.proc.returncode}; "
                                f"see {self.opts.log_path or 'its output'}")
            if port_open(host, self.opts.grpc_port) and port_open(host, self.opts.thrift_port):
                return
            time.sleep(0.05)
        self.stop()
        raise Bmv2Error(f"simple_switch_grpc did not open {self.opts.grpc_address} "
                        f"within {timeout:.0f} s")

    def stop(self, kill: bool = False) -> None:
        """End the switch (SIGTERM, or SIGKILL to emulate a crash) and reap it."""
        if not self.proc or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> Bmv2Switch:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
