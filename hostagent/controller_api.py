"""The agent's side of the controller's REST API (see docs/agent.md for the contract).

    POST   /api/v1/backends                 register  -> 201 {"backend_id", "tenants", ...}
    POST   /api/v1/backends/{name}/report   every ~1 s -> 2xx (may carry "tenants")
    POST   /api/v1/backends/{name}/kv       the KV block set (prefix index)
    POST   /api/v1/backends/{name}/affinity a client's prefix is cached here (switch affinity)
    GET    /api/v1/backends/{name}          the backend as the controller sees it (services)
    DELETE /api/v1/backends/{name}          on exit
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp


class ControllerError(Exception):
    """The controller refused a call, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Registration:
    backend_id: int
    tenants: list[dict] = field(default_factory=list)
    roce: dict = field(default_factory=dict)


class ControllerClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str | None,
                 timeout: float = 3.0) -> None:
        self.session = session
        self.base = base_url.rstrip("/") + "/api/v1"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = self.base + path
        try:
            async with self.session.request(method, url, json=body, headers=self.headers,
                                            timeout=self.timeout) as reply:
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

    async def register(self, body: dict) -> Registration:
        status, data = await self._call("POST", "/backends", body)
        if status not in (200, 201):
            raise ControllerError(f"registration refused: HTTP {status}: "
                                  f"{self._detail(status, data)}", status)
        if not isinstance(data, dict) or not isinstance(data.get("backend_id"), int):
            raise ControllerError(f"registration answer has no integer backend_id: {data!r}",
                                  status)
        tenants = data.get("tenants") or []
        if not isinstance(tenants, list):
            raise ControllerError("registration answer: tenants is not a list", status)
        roce = data.get("roce")
        if not isinstance(roce, dict):
            roce = {}
        return Registration(data["backend_id"], tenants, roce)

    async def report(self, name: str, body: dict) -> dict:
        return await self._post_backend(name, "report", body, "report")

    async def kv_report(self, name: str, body: dict) -> dict:
        """A block-set delta or snapshot for the prefix index (controller/prefix_index.py)."""
        return await self._post_backend(name, "kv", body, "KV report")

    async def affinity_report(self, name: str, service: str, client: str) -> dict:
        """The bridge of `name` decided that `client`'s prompts are cached here: the
        client's edge switch steers its next new connections to `name` (docs/rest.md)."""
        return await self._post_backend(name, "affinity", {"service": service,
                                                            "client": client},
                                        "affinity report")

    async def backend(self, name: str) -> dict:
        """The controller's view of backend `name` (its `services` among others)."""
        status, data = await self._call("GET", f"/backends/{name}")
        if status != 200 or not isinstance(data, dict):
            raise ControllerError(f"backend view refused: HTTP {status}: "
                                  f"{self._detail(status, data)}", status)
        return data

    async def _post_backend(self, name: str, leaf: str, body: dict, what: str) -> dict:
        status, data = await self._call("POST", f"/backends/{name}/{leaf}", body)
        if not 200 <= status < 300:
            raise ControllerError(f"{what} refused: HTTP {status}: "
                                  f"{self._detail(status, data)}", status)
        return data if isinstance(data, dict) else {}

    async def deregister(self, name: str) -> None:
        status, data = await self._call("DELETE", f"/backends/{name}")
        if status not in (200, 202, 204, 404):
            raise ControllerError(f"deregistration refused: HTTP {status}: "
                                  f"{self._detail(status, data)}", status)
