"""Affinity reports: the bridge's prefix decisions reach the switch (issue 15 item 4).

A request of an opted-in tenant served here because this backend holds its prompt's
prefix (the handoff decision `local_longest`), or handed here by a peer's bridge (a
verified handoff, whose signed header names the client), makes the agent tell the
controller "client -> this backend" (POST /api/v1/backends/{name}/affinity); the
controller installs it on the client's edge switch, which steers that client's next new
connections here while this backend's load allows (docs/prefix-cache.md).

Never on the request path: the bridge only calls `note()`, which files the client in a
bounded dict (a full one drops and counts) and returns; a background task sends them
through the agent's ControllerClient. A client reported within the window (30 s, or a
quarter of the switch entry's TTL when shorter) is not reported again: the entry is
still there, and each report is a REST call. A refusal (409: the tenant did not opt in,
or the client is behind no edge switch the fabric knows) is normal and only counted.

A shared address (an app server, a NAT: the bridge saw two of its requests in flight at
once, which one conversation never has) carries many conversations whose prefixes live on
different backends: steering all its connections to one backend would only pile them up
there for handoffs. It is not reported for `shared_s`, and this backend's entry for it is
withdrawn (DELETE, the agent's own only); its requests reach their prefixes by p2c and
the bridges' handoffs.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Callable

from tokenfabric.hostagent.controller_api import ControllerClient, ControllerError, Replicated
from tokenfabric.hostagent.handoff import HandoffMetrics, SharedClients

log = logging.getLogger(__name__)


SERVICES_RETRY_S = 1.0       # the backend's services unknown: ask again this often
MAX_REMEMBERED = 65536       # (service, client) pairs whose last report is remembered


class AffinityReporter:
    """One agent's pending affinity reports and its sender task."""

    def __init__(self, backend: str, metrics: HandoffMetrics, window_s: float = 30.0,
                 max_pending: int = 1024,
                 clock: Callable[[], float] = time.monotonic, shared_s: float = 300.0,
                 shared_clients: SharedClients | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.window_s = window_s
        # shared addresses, not reported while they are (the agent's handoff's memory,
        # which weighs their requests); withdrawals to send
        self.shared_clients = shared_clients or SharedClients(shared_s, clock)
        self.withdrawals: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.max_pending = max_pending
        self.clock = clock
        # the services whose pool holds this backend (GET /backends/{name}); None: unknown
        self.services: list[str] | None = None
        self.pending: collections.OrderedDict[str, None] = collections.OrderedDict()
        # (service, client) -> until when a new report of it is a duplicate
        self.recent: collections.OrderedDict[tuple[str, str], float] = \
            collections.OrderedDict()
        self.wake = asyncio.Event()

    def _count(self, outcome: str, n: int = 1) -> None:
        self.metrics.affinity.labels(self.backend, outcome).inc(n)
        self.metrics.counts[("affinity", outcome)] += n

    def _fresh(self, service: str, client: str, now: float) -> bool:
        until = self.recent.get((service, client))
        return until is not None and now < until

    @staticmethod
    def _address(client: str) -> str | None:
        try:
            address = ipaddress.IPv4Address(client)
        except ValueError:
            return None  # not an IPv4 client (the switch's affinity table keys IPv4 sources)
        if address.is_loopback or address.is_unspecified or address.is_multicast:
            return None  # no switch sees such a source (the controller would answer 422)
        return str(address)

    def shared(self, client: str) -> None:
        """`client` is a shared address (see the module docstring): no reports of it for
        `shared_s`, and this backend's entry withdrawn (never blocks, never raises)."""
        address = self._address(client)
        if address is None:
            return
        known = self.shared_clients.holds(address)
        self.shared_clients.mark(address)
        self.pending.pop(address, None)
        if not known and len(self.withdrawals) < self.max_pending:
            self.withdrawals[address] = None
            self.wake.set()

    def note(self, client: str) -> None:
        """`client`'s prompts are cached here: report it soon (never blocks, never raises)."""
        address = self._address(client)
        if address is None:
            return
        client = address
        now = self.clock()
        if self.shared_clients.holds(client, now):
            self._count("shared")
            return
        services = self.services
        if client in self.pending or (services and all(
                self._fresh(s, client, now) for s in services)):
            self._count("deduped")
            return
        if len(self.pending) >= self.max_pending:
            self._count("dropped")
            return
        self.pending[client] = None
        self.wake.set()

    def forget_services(self) -> None:
        """The backend registered anew: its services may have changed."""
        self.services = None

    async def run(self, controller: ControllerClient | Replicated, ready: asyncio.Event) -> None:
        """Send the pending reports, one at a time, once the backend is registered."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            await ready.wait()
            if self.services is None and not await self._learn_services(controller):
                await asyncio.sleep(SERVICES_RETRY_S)
                self.wake.set()
                continue
            while self.withdrawals:
                client, _ = self.withdrawals.popitem(last=False)
                for service in self.services or []:
                    await self._withdraw(controller, service, client)
            while self.pending:
                client, _ = self.pending.popitem(last=False)
                for service in self.services or []:
                    try:
                        await self._send(controller, service, client)
                    except Exception:  # a bug must cost one report, not the agent
                        self._count("failed")
                        log.exception("affinity report %s -> %s failed", client,
                                      self.backend)

    async def _learn_services(self, controller: ControllerClient | Replicated) -> bool:
        try:
            view = await controller.backend(self.backend)
        except ControllerError as exc:
            log.debug("affinity: the services of %s unknown yet: %s", self.backend, exc)
            return False
        services = view.get("services")
        if not isinstance(services, list):
            return False
        self.services = [s for s in services if isinstance(s, str)]
        return True

    async def _withdraw(self, controller: ControllerClient | Replicated, service: str,
                        client: str) -> None:
        self.recent.pop((service, client), None)  # reported again once no longer shared
        try:
            answer = await controller.affinity_withdraw(self.backend, service, client)
        except ControllerError as exc:
            self._count("failed")
            log.debug("affinity withdrawal %s -> %s (%s): %s", client, self.backend,
                      service, exc)
            return
        except Exception:  # a bug must cost one withdrawal, not the agent
            self._count("failed")
            log.exception("affinity withdrawal %s -> %s failed", client, self.backend)
            return
        if answer.get("withdrawn"):
            self._count("withdrawn")

    async def _send(self, controller: ControllerClient | Replicated, service: str,
                    client: str) -> None:
        now = self.clock()
        if self._fresh(service, client, now):
            self._count("deduped")
            return
        # remembered whatever the answer: a refused client is not asked about again
        # within the window either
        self.recent[(service, client)] = now + self.window_s
        self.recent.move_to_end((service, client))
        while len(self.recent) > MAX_REMEMBERED:
            self.recent.popitem(last=False)
        try:
            answer = await controller.affinity_report(self.backend, service, client)
        except ControllerError as exc:
            refused = exc.status is not None and 400 <= exc.status < 500
            self._count("refused" if refused else "failed")
            if not refused:
                self.recent.pop((service, client), None)  # not learned: may try again
            log.debug("affinity report %s -> %s (%s): %s", client, self.backend, service,
                      exc)
            return
        self._count("sent")
        ttl = answer.get("ttl_s")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
            # refreshed before the switch's entry expires, whatever the window says
            self.recent[(service, client)] = now + min(self.window_s, ttl / 4)
