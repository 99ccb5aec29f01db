"""The lab's `ha` experiment (issue 18, docs/replicas.md): two controller replicas on a
throw-away PostgreSQL, the leader SIGKILLed under load, then restarted.

What it measures, written to ha.json and summary.md of the run:
- takeover: from the kill to the moment every P4Runtime switch names a new primary
  (a higher election id), read back from the switches by a session of their own
  (controller/replica.py PrimaryWatch; BMv2 only: OVS has no P4Runtime);
- the restarted replica: joins as a backup (its /replica), the switches keep the new
  leader;
- the ledger against the agents: after the load, each agent is stopped and logs what a
  controller acknowledged of its usage (per tenant); the ledger's totals per tenant
  (the leader's GET /ledger) must equal their sum: a difference is a lost or a
  duplicated acknowledged row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenfabric.lab.stack import Stack

log = logging.getLogger(__name__)


TAKEOVER_TARGET_S = 2.0
ACK_LINE = re.compile(r"usage acknowledged at exit: (\{.*\})")


class HaProbe:
    """P4Runtime read-back of who is primary on each switch, in its own event loop."""

    def __init__(self, switches: dict[str, dict[str, Any]]) -> None:
        from tokenfabric.controller.replica import PrimaryWatch

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="ha-probe")
        self.watches = {name: PrimaryWatch(sw["address"], int(sw.get("device_id", 0)))
                        for name, sw in switches.items()
                        if sw.get("driver", "p4runtime") != "openflow"}
        self.result: dict[str, Any] = {}

    def start(self) -> None:
        self.thread.start()
        for watch in self.watches.values():
            asyncio.run_coroutine_threadsafe(watch.start(), self.loop).result(10)

    def primaries(self) -> dict[str, int | None]:
        return {name: w.primary_election_id for name, w in self.watches.items()}

    def kill_leader(self, stack: Stack, started: float) -> float:
        """SIGKILL the leading replica; wait (<= 10 s) until every switch has a new
        primary; record the figures. Returns the kill's wall-clock time."""
        before = self.primaries()
        leader, at = stack.kill_controller()
        self.result.update({"killed_replica": leader, "killed_at_s": at - started,
                            "killed_wall": at, "primary_before": before})
        deadline = time.monotonic() + 10
        seen: dict[str, float] = {}
        while time.monotonic() < deadline and len(seen) < len(self.watches):
            for name, watch in self.watches.items():
                now_id = watch.primary_election_id
                if name not in seen and now_id is not None and now_id > (before[name] or 0):
                    seen[name] = time.time()
            time.sleep(0.002)
        self.result["primary_after"] = self.primaries()
        self.result["takeover_s"] = {n: round(t - at, 3) for n, t in seen.items()}
        missing = sorted(set(self.watches) - set(seen))
        if missing:
            self.result["no_takeover"] = missing
        rest = stack.wait_leader(10.0)
        self.result["rest_leader_after_s"] = None if rest is None else round(rest - at, 3)
        return at

    def restart_killed(self, stack: Stack, started: float) -> float:
        index = self.result.get("killed_replica")
        at = time.time()
        if index is None:
            return at
        stack.restart_controller(index)
        role = stack.wait_role(index, 20.0)
        self.result.update({"restarted_at_s": at - started, "restarted_role": role,
                            "primary_after_restart": self.primaries()})
        return at

    def stop(self) -> None:
        for watch in self.watches.values():
            try:
                asyncio.run_coroutine_threadsafe(watch.stop(), self.loop).result(10)
            except Exception as exc:  # noqa: BLE001 - teardown goes on
                log.warning("P4Runtime watch: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def ledger_against_agents(stack: Stack, logs: Path) -> dict[str, Any]:
    """Stop every backend's agent (SIGTERM: it logs what was acknowledged) and compare
    with the ledger's totals per tenant."""
    time.sleep(2.0)  # the last reports of the load
    for name in list(stack.backend_procs):
        if name in stack.plan.hosts and stack.plan.hosts[name].role == "backend":
            stack.net.stop_process(stack.backend_procs[name][-1])
    agents: dict[str, list[int]] = {}
    found = 0
    for path in sorted(logs.glob("agent-*.log")):
        matches = ACK_LINE.findall(path.read_text(errors="replace"))
        if not matches:
            continue
        found += 1
        for tenant, usage in json.loads(matches[-1]).items():
            acc = agents.setdefault(tenant, [0, 0, 0])
            acc[0] += usage["prompt_tokens"]
            acc[1] += usage["completion_tokens"]
            acc[2] += usage["requests"]
    ledger: dict[str, list[int]] = {}
    for row in stack.get("/ledger"):
        acc = ledger.setdefault(str(row["tenant_id"]), [0, 0, 0])
        acc[0] += row["prompt_tokens"]
        acc[1] += row["completion_tokens"]
        acc[2] += row["requests"]
    tenants = sorted(set(agents) | set(ledger))
    diff = {t: [a - b for a, b in zip(ledger.get(t, [0, 0, 0]), agents.get(t, [0, 0, 0]),
                                      strict=True)] for t in tenants}
    return {"agents_reporting": found, "agents": agents, "ledger": ledger,
            "ledger_minus_agents": diff,
            "lost_or_duplicated": any(any(v) for v in diff.values())}


def failed_near(records: list[dict[str, Any]], kill_at: float, window_s: float = 5.0,
                ) -> tuple[int, int]:
    """(failed, all) requests that were running at the kill or started within
    `window_s` after it: what the kill could have failed."""
    near = [r for r in records if r.get("start") is not None
            and r["start"] <= kill_at + window_s
            and (r.get("e2e") is None or r["start"] + r["e2e"] >= kill_at)]
    return sum(1 for r in near if not r.get("ok")), len(near)


def markdown(result: dict[str, Any]) -> str:
    takeover = result.get("takeover_s") or {}
    worst = max(takeover.values()) if takeover else None
    lines = ["controller replicas (docs/replicas.md):"]
    if worst is None:
        lines.append("- takeover: no P4Runtime switch read back (OVS?)"
                     if not result.get("no_takeover") else
                     f"- takeover: NONE on {', '.join(result['no_takeover'])}")
    else:
        met = "met" if worst <= TAKEOVER_TARGET_S else "NOT met"
        lines.append(f"- takeover (every switch names a new primary, read back over "
                     f"P4Runtime): {worst:.3f} s after the kill (target <= "
                     f"{TAKEOVER_TARGET_S:g} s: {met})"
                     f"; primary election ids {result.get('primary_before')} -> "
                     f"{result.get('primary_after')}")
    if result.get("rest_leader_after_s") is not None:
        lines.append(f"- the backup's REST says primary {result['rest_leader_after_s']:.3f} s "
                     "after the kill")
    if "failed_near_kill" in result:
        failed, near = result["failed_near_kill"]
        lines.append(f"- requests failed because of the kill (running at it or started within "
                     f"5 s after): {failed} of {near} (target 0); failed in the whole run: "
                     f"{result.get('failed_total')}")
    if "restarted_role" in result:
        lines.append(f"- the killed replica, restarted: {result['restarted_role']}; switches' "
                     f"primary then {result.get('primary_after_restart')}")
    check = result.get("ledger")
    if check:
        lines.append(f"- ledger per tenant [prompt, completion, requests] vs the "
                     f"{check['agents_reporting']} agents' acknowledged counters: ledger "
                     f"{check['ledger']}, agents {check['agents']}; ledger - agents "
                     f"{check['ledger_minus_agents']} ("
                     + ("LOST OR DUPLICATED rows" if check["lost_or_duplicated"] else
                        "0 lost, 0 duplicated") + ")")
    return "\n".join(lines) + "\n"
