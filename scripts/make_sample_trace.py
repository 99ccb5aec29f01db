"""Write a small synthetic trace in the Mooncake format (tokenfabric/lab/workloads.py).

    python scripts/make_sample_trace.py examples/traces/sample-mooncake.jsonl

Made up here, from a seed, not taken from any real trace: 4 applications, each with a
system prompt of 2-4 blocks that all its sessions share; sessions of 1-5 turns whose
every turn extends the previous turn's blocks (history) by 1-3 new blocks; Poisson
session starts, think times between turns. Block size 512 tokens as Mooncake's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

BLOCK = 512


def make(requests: int = 200, seed: int = 15) -> list[dict]:
    rng = np.random.default_rng(seed)
    next_id = 0

    def new_blocks(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    systems = [new_blocks(int(rng.integers(2, 5))) for _ in range(4)]
    rows: list[dict] = []
    start = 0.0
    while len(rows) < requests:
        start += rng.exponential(400.0)               # a session every 0.4 s on average
        history = list(systems[int(rng.integers(0, len(systems)))])
        at = start
        for _ in range(int(rng.integers(1, 6))):
            history += new_blocks(int(rng.integers(1, 4)))
            partial = int(rng.integers(1, BLOCK))      # the last block is partial
            rows.append({"timestamp": int(at), "input_length": (len(history) - 1) * BLOCK
                         + partial, "output_length": int(rng.integers(20, 400)),
                         "hash_ids": list(history)})
            at += rng.exponential(3000.0)
    rows.sort(key=lambda r: r["timestamp"])
    return rows[:requests]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/traces/sample-mooncake.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in make()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
