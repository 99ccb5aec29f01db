"""What `tokenfabric policy validate FILE [--fabric FABRIC]` needs (controller/cli.py calls it).

The CLI prints each returned line and exits with code 4 when there is any.
"""

from __future__ import annotations

from pathlib import Path

from tokenfabric.controller.fabric import load_fabric
from tokenfabric.controller.model import Model
from tokenfabric.controller.policy.reload import validate_policy
from tokenfabric.controller.policy.source import SpecError


def validate_file(path: str | Path, fabric: str | Path | None = None) -> list[str]:
    """Every problem of a policy file as `file:line: field.path: message`; [] when valid.

    Without a fabric, references to services are not checked (there are none to
    check against); with one, they are, and the policy is compiled for its switches.
    """
    model = Model()
    if fabric is not None:
        try:
            model = load_fabric(fabric)
        except SpecError as exc:
            return exc.errors
    _, errors = validate_policy(model, path)
    return errors


def summarize_file(path: str | Path, fabric: str | Path | None = None) -> list[str]:
    """One line per tenant and contract of a valid file (for `validate --verbose`)."""
    model = load_fabric(fabric) if fabric is not None else Model()
    policy, errors = validate_policy(model, path)
    if policy is None:
        return errors
    lines = [f"{len(policy.tenants)} tenants, {len(policy.contracts)} contracts"]
    for c in policy.contracts.values():
        tc = c.traffic_class
        q = f" 5QI {c.fiveqi.value}" if c.fiveqi else ""
        lines.append(f"contract {c.name}:{q} {tc.service_class} dscp {tc.dscp} queue {tc.queue}"
                     f" tpm {c.limits.tpm} burst {c.limits.burst}")
    for t in policy.tenants.values():
        lines.append(f"tenant {t.name} (id {t.tenant_id}): {', '.join(t.prefixes)}"
                     f" -> {t.contract}{' trusts DSCP' if t.trust_dscp else ''}")
    return lines
