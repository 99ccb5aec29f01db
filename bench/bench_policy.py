"""Benchmark: validating a policy file at operator scale, against merely loading its YAML.

Three generated files (bench/policygen.py), each validated as `tokenfabric policy
validate FILE --fabric examples/fabric-single.yaml` does (parse with line numbers,
check every field and reference, compile for the fabric's switch):
- 20,000 tenants, one unknown key each (~1.7 MB): 20,001 errors, of which the first
  40 are printed and the rest counted;
- 20,000 tenants without error of their own (~1.4 MB): one error, more tenants than
  the dataplane's 4,095 tenant slots;
- 4,095 tenants (~0.3 MB): valid, compiled to ~12,000 entries.
The baseline is the time to merely load the same text with ruamel.yaml's safe loader
on libyaml (`YAML(typ="safe").load(text)`, ruamel.yaml.clib), measured in the same
run; each time is the best of --rounds. Target: the 20,000-tenant files validate in under 2 s.
`--ruamel` also times the round-trip load the validator used before (~10 s per file).

    python bench/bench_policy.py [--tenants 20000] [--rounds 3] [--ruamel]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.policygen import policy_text  # noqa: E402
from tokenfabric.controller.fabric import load_fabric  # noqa: E402
from tokenfabric.controller.policy.reload import validate_policy  # noqa: E402
from tokenfabric.p4names import MAX_TENANTS  # noqa: E402

FABRIC = REPO / "examples" / "fabric-single.yaml"
TARGET_S = 2.0


def best_of(rounds: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ruamel", action="store_true",
                        help="also time ruamel's round-trip load (the loader used before)")
    args = parser.parse_args()
    model = load_fabric(FABRIC)
    cases = [(f"{args.tenants:,} tenants, an unknown key each", True,
              policy_text(args.tenants, unknown_key=True)),
             (f"{args.tenants:,} tenants, no error of their own", True,
              policy_text(args.tenants)),
             (f"{MAX_TENANTS - 1:,} tenants, valid", False, policy_text(MAX_TENANTS - 1))]
    print(f"policy validation benchmark (best of {args.rounds}; against {FABRIC.name})")
    met = True
    for name, has_target, text in cases:
        load_s, _ = best_of(args.rounds, lambda t=text: YAML(typ="safe").load(t))
        check_s, (policy, errors) = best_of(
            args.rounds, lambda t=text: validate_policy(model, "", text=t, file="policy.yaml"))
        outcome = f"valid, {len(policy.tenants):,} tenants" if policy is not None else \
            f"{len(errors)} lines printed, last: {errors[-1][:90]}"
        print(f"  {name} ({len(text) / 1e6:.2f} MB): validate {check_s:.3f} s, "
              f"YAML load {load_s:.3f} s, ratio {check_s / load_s:.2f}x")
        print(f"    {outcome}")
        if args.ruamel:
            rt_s, _ = best_of(1, lambda t=text: YAML(typ="rt").load(t))
            print(f"    ruamel round-trip load alone: {rt_s:.3f} s")
        if has_target:
            met = met and check_s < TARGET_S and len(errors) <= 41
    print(f"  target: the {args.tenants:,}-tenant files in under {TARGET_S:.0f} s with at "
          f"most 41 lines: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
