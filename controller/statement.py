"""A tenant's statement: its usage per model over a time range, priced by its contract.

Usage comes from the journal (controller/ledger_chain.py), the ledger's tamper-evident
rows, not from the per-minute table; rows count by when the controller received them,
in [since, until). Prices are the contract's in the policy given (the running one over
REST): per million input (prompt) and output (completion) tokens, per model, "*" for
models not named. Amounts are Decimal, rounded half-up to 6 places per line; the total
is the sum of the lines. A model without a price shows its tokens and no amount.
"""

from __future__ import annotations

import csv
import io
import time
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

from tokenfabric.controller.csv_cells import safe_row
from tokenfabric.controller.model import Contract, ModelPrice, Policy, Tenant

if TYPE_CHECKING:
    from tokenfabric.controller.ledger_store import Store

MILLION = Decimal(1_000_000)
PLACES = Decimal("0.000001")


def usage_by_model(db: Store, tenant_id: int, since: float | None,
                   until: float | None) -> dict[str, tuple[int, int, int]]:
    """model -> (prompt, completion, requests) of the tenant's journal rows in the range."""
    clauses, args = ["kind = 'usage'", "tenant_id = ?"], [tenant_id]
    if since is not None:
        clauses.append("received_ms >= ?")
        args.append(int(round(since * 1000)))
    if until is not None:
        clauses.append("received_ms < ?")
        args.append(int(round(until * 1000)))
    rows = db.execute(
        "SELECT model, CAST(SUM(prompt_tokens) AS BIGINT), "
        "CAST(SUM(completion_tokens) AS BIGINT), CAST(SUM(requests) AS BIGINT) "
        f"FROM journal WHERE {' AND '.join(clauses)} GROUP BY model ORDER BY model",
        args).fetchall()
    return {m: (p, c, r) for m, p, c, r in rows}


def find_tenant(policy: Policy, key: str | int) -> Tenant | None:
    """A tenant by name, or by id (an int, or digits)."""
    if isinstance(key, str) and key in policy.tenants:
        return policy.tenants[key]
    if isinstance(key, int) or str(key).isdigit():
        wanted = int(key)
        return next((t for t in policy.tenants.values() if t.tenant_id == wanted), None)
    return None


def price_of(contract: Contract | None, model: str) -> ModelPrice | None:
    if contract is None:
        return None
    return contract.prices.get(model) or contract.prices.get("*")


def build(tenant: Tenant, contract: Contract | None, usage: dict[str, tuple[int, int, int]],
          since: float | None, until: float | None) -> dict[str, Any]:
    lines = []
    total = Decimal(0)
    priced_all = True
    for model, (prompt, completion, requests) in sorted(usage.items()):
        price = price_of(contract, model)
        amount = None
        if price is not None:
            amount = (Decimal(prompt) * price.input_per_million / MILLION
                      + Decimal(completion) * price.output_per_million / MILLION
                      ).quantize(PLACES, rounding=ROUND_HALF_UP)
            total += amount
        else:
            priced_all = False
        lines.append({
            "model": model, "prompt_tokens": prompt, "completion_tokens": completion,
            "requests": requests,
            "input_per_million": None if price is None else str(price.input_per_million),
            "output_per_million": None if price is None else str(price.output_per_million),
            "amount": None if amount is None else str(amount)})
    return {"tenant": tenant.name, "tenant_id": tenant.tenant_id,
            "contract": tenant.contract,
            "currency": contract.currency if contract else None,
            "from": _stamp(since), "to": _stamp(until), "lines": lines,
            "total": str(total.quantize(PLACES)), "all_priced": priced_all}


def _stamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


CSV_HEADER = ["tenant", "tenant_id", "contract", "currency", "from", "to", "model",
              "prompt_tokens", "completion_tokens", "requests", "input_per_million",
              "output_per_million", "amount"]


def to_csv(statement: dict[str, Any]) -> str:
    """One line per model and a TOTAL line; text cells safe for spreadsheets."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    head = [statement[k] for k in ("tenant", "tenant_id", "contract", "currency", "from", "to")]
    for line in statement["lines"]:
        writer.writerow(safe_row([*head, line["model"], line["prompt_tokens"],
                                  line["completion_tokens"], line["requests"],
                                  line["input_per_million"], line["output_per_million"],
                                  line["amount"]]))
    writer.writerow(safe_row([*head, "TOTAL", sum(x["prompt_tokens"] for x in statement["lines"]),
                              sum(x["completion_tokens"] for x in statement["lines"]),
                              sum(x["requests"] for x in statement["lines"]), None, None,
                              statement["total"]]))
    return buf.getvalue()
