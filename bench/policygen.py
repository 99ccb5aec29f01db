"""Policy files at operator scale, for bench/bench_policy.py and the API's hostile-client tests."""

from __future__ import annotations

CONTRACTS = """\
version: 1
contracts:
  gold:
    class: {service_class: low-latency-data, dscp: 18, queue: 5, priority_level: 2}
    tpm: 60000
  bronze:
    class: {service_class: standard, dscp: 0, queue: 1, priority_level: 9}
    tpm: 6000
tenants:
"""


def policy_text(tenants: int, unknown_key: bool = False) -> str:
    """`tenants` tenants, one /32 each in 10.0.0.0/16 (clear of the test fabrics' VIPs in
    10.0.100.0/24 up to 25,000 tenants); with `unknown_key`, each has one key too many."""
    lines = [CONTRACTS]
    for i in range(tenants):
        block, host = divmod(i, 250)
        block += block >= 100  # skip 10.0.100.0/24, where the services' VIPs are
        extra = f", colour: c{i}" if unknown_key else ""
        lines.append(f"  - {{name: tenant{i:05d}, prefixes: [10.{block // 256}.{block % 256}."
                     f"{host + 1}/32], contract: {'gold' if i % 2 else 'bronze'}{extra}}}\n")
    return "".join(lines)
