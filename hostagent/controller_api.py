"""The agent's side of the controller's REST API (see docs/agent.md for the contract).

    POST   /api/v1/backends                 register  -> 201 {"backend_id", "tenants", ...}
    POST   /api/v1/backends/{name}/report   every ~1 s -> 2xx (may carry "tenants")
    POST   /api/v1/backends/{name}/kv       the KV block set (prefix index)
    POST   /api/v1/backends/{name}/claim    a prompt's blocks this backend will hold (index)
    POST   /api/v1/backends/{name}/affinity a client's prefix is cached here (switch affinity)
    GET    /api/v1/backends/{name}          the backend as the controller sees it (services)
    DELETE /api/v1/backends/{name}          on exit

With controller replicas (docs/replicas.md) the agent talks to every one of them
(Replicated): each keeps its model current from the agent's calls, and the shared
ledger writes a report once whichever replica writes it first (the report's id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from pydantic import ValidationError

from tokenfabric.wire import BackendRegistration, RegistrationReply


class ControllerError(Exception):
    """The controller refused a call, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


ROLE_HEADER = "X-Tokenfabric-Role"  # a replica's answers say whether it leads
T = TypeVar("T")


class ControllerClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str | None,
                 timeout: float = 3.0) -> None:
        self.session = session
        self.url = base_url.rstrip("/")
        self.base = self.url + "/api/v1"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.role: str | None = None  # "primary" | "backup" from its last answer, if said

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = self.base + path
        try:
            async with self.session.request(method, url, json=body, headers=self.headers,
                                            timeout=self.timeout) as reply:
                self.role = reply.headers.get(ROLE_HEADER)
                try:
                    data = await reply.json(content_type=None)
                except ValueError:
                    data = None
                return reply.status, data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ControllerError(f"{method} {url}: {exc.__class__.__name__}: {exc}") from exc

    @staticmethod
    def _detail(status: int, data: Any) -> str:
        if isinstance(data, dict):
            return str(data.get("detail") or data.get("error") or data)
        return f"HTTP {status}"

    async def register(self, body: BackendRegistration) -> RegistrationReply:
        """The reply's tenants keep only the keys the controller sent (exclude_unset), so
        that a tenant without a request priority takes the agent's configured one."""
        status, data = await self._call("POST", "/backends", body.model_dump())
        if status not in (200, 201):
            raise ControllerError(f"registration refused: HTTP {status}: "
                                  f"{self._detail(status, data)}", status)
        try:
            return RegistrationReply.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the reply"
            raise ControllerError(f"registration answer is not valid: {where}: "
                                  f"{first['msg']}", status) from None

    async def report(self, name: str, body: dict) -> dict:
        return await self._backend_call(name, "report", body, "report")

    async def kv_report(self, name: str, body: dict) -> dict:
        """A block-set delta or snapshot for the prefix index (controller/prefix_index.py)."""
        return await self._backend_call(name, "kv", body, "KV report")

    async def claim(self, name: str, body: dict) -> dict:
        """Block keys `name` was chosen to serve, pending until its KV report confirms
        them (controller/prefix_index.py)."""
        return await self._backend_call(name, "claim", body, "prefix claim")

    async def affinity_report(self, name: str, service: str, client: str) -> dict:
        """The bridge of `name` decided that `client`'s prompts are cached here: the
        client's edge switch steers its next new connections to `name` (docs/rest.md)."""
        return await self._backend_call(name, "affinity", {"service": service,
                                                            "client": client},
                                        "affinity report")

    async def affinity_withdraw(self, name: str, service: str, client: str) -> dict:
        """`client` is no longer `name`'s to attract (a shared address): its entry goes."""
        return await self._backend_call(name, "affinity", {"service": service,
                                                           "client": client},
                                        "affinity withdrawal", "DELETE")

    async def backend(self, name: str) -> dict:
        """The controller's view of backend `name` (its `services` among others)."""
        status, data = await self._call("GET", f"/backends/{name}")
        if status != 200 or not isinstance(data, dict):
            raise ControllerError(f"backend view refused: HTTP {status}: "
                                  f"{self._detail(status, data)}", status)
        return data

    async def _backend_call(self, name: str, leaf: str, body: dict, what: str,
                            method: str = "POST") -> dict:
        status, data = await self._call(method, f"/backends/{name}/{leaf}", body)
        if not 200 <= status < 300:
            raise ControllerError(f"{what} refused: HTTP {status}: "
                                  f"{self._detail(status, data)}", status)
        return data if isinstance(data, dict) else {}

    async def deregister(self, name: str) -> None:
        status, data = await self._call("DELETE", f"/backends/{name}")
        if status not in (200, 202, 204, 404):
            raise ControllerError(f"deregistration refused: HTTP {status}: "
                                  f"{self._detail(status, data)}", status)


class Replicated:
    """ControllerClient's calls made to every controller replica at once.

    A call succeeds when one replica took it (they share the ledger: a report one of
    them recorded is recorded); the answer used is the leader's when it answered (its
    drain flags and tenants are the ones of record), else the first one. A replica
    that has forgotten the backend (404: restarted) is registered again and the call
    repeated there. Failing everywhere raises the most telling error (a refusal over
    404 over unreachable)."""

    def __init__(self, clients: list[ControllerClient]) -> None:
        if not clients:
            raise ValueError("no controller URL")
        self.clients = clients
        self._registration: BackendRegistration | None = None

    async def _each(self, call: Callable[[ControllerClient], Awaitable[T]],
                    name: str | None = None) -> T:
        async def one(client: ControllerClient) -> T:
            try:
                return await call(client)
            except ControllerError as exc:
                # one controller: its 404 goes to the agent, which registers again
                if exc.status != 404 or name is None or self._registration is None \
                        or len(self.clients) == 1:
                    raise
                await client.register(self._registration)  # it restarted: register there
                return await call(client)

        results = await asyncio.gather(*(one(c) for c in self.clients),
                                       return_exceptions=True)
        answers = [(c, r) for c, r in zip(self.clients, results, strict=True)
                   if not isinstance(r, BaseException)]
        if answers:
            for client, answer in answers:
                if client.role == "primary":
                    return answer
            return answers[0][1]
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, ControllerError):
                raise error
        refusals = [e for e in errors if isinstance(e, ControllerError)
                    and e.status is not None and e.status != 404]
        not_found = [e for e in errors if isinstance(e, ControllerError) and e.status == 404]
        raise (refusals or not_found or errors)[0]

    async def register(self, body: BackendRegistration) -> RegistrationReply:
        self._registration = body
        return await self._each(lambda c: c.register(body))

    async def report(self, name: str, body: dict) -> dict:
        return await self._each(lambda c: c.report(name, body), name)

    async def kv_report(self, name: str, body: dict) -> dict:
        return await self._each(lambda c: c.kv_report(name, body), name)

    async def claim(self, name: str, body: dict) -> dict:
        return await self._each(lambda c: c.claim(name, body), name)

    async def affinity_report(self, name: str, service: str, client: str) -> dict:
        return await self._each(lambda c: c.affinity_report(name, service, client), name)

    async def affinity_withdraw(self, name: str, service: str, client: str) -> dict:
        return await self._each(lambda c: c.affinity_withdraw(name, service, client), name)

    async def backend(self, name: str) -> dict:
        return await self._each(lambda c: c.backend(name))

    async def deregister(self, name: str) -> None:
        await self._each(lambda c: c.deregister(name))
