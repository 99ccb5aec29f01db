"""Sends beacons (tokenfabric.beacon wire format) to the edge switch over UDP."""

from __future__ import annotations

import logging
import socket
import time

from tokenfabric.beacon import U16_MAX, U32_MAX, BeaconFlags, LoadBeacon, UsageBeacon

log = logging.getLogger(__name__)


class BeaconSender:
    """One UDP socket, one sequence number shared by LOAD and USAGE beacons."""

    def __init__(self, target: tuple[str, int], source: str | None = None) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        if source:
            self.sock.bind((source, 0))
        self.seq = 0
        self.sent = 0
        self.errors = 0
        self._last_error_log = 0.0

    def _send(self, payload: bytes) -> None:
        try:
            self.sock.sendto(payload, self.target)
            self.sent += 1
        except OSError as exc:  # no route, buffer full: a beacon is lost, the next one follows
            self.errors += 1
            now = time.monotonic()
            if now - self._last_error_log > 10:
                self._last_error_log = now
                log.warning("beacon to %s:%d not sent: %s", *self.target, exc)
        self.seq = (self.seq + 1) & U16_MAX

    def load(self, backend_id: int, load: int, running: int, waiting: int, down: bool,
             draining: bool = False) -> None:
        flags = BeaconFlags.DOWN if down else BeaconFlags.NONE
        if draining:
            flags |= BeaconFlags.DRAINING
        self._send(LoadBeacon(backend_id, load, running, waiting, flags, self.seq).pack())

    def usage(self, backend_id: int, tenant_id: int, prompt_tokens: int,
              completion_tokens: int) -> None:
        self._send(UsageBeacon(backend_id, tenant_id, min(prompt_tokens, U32_MAX),
                               min(completion_tokens, U32_MAX), self.seq).pack())

    def close(self) -> None:
        self.sock.close()
