"""Billing against the network: could a backend's billed tokens fit in the bytes it sent?

With direct server return a backend's replies enter the fabric at its own switch port,
so the bytes the switch received on that port (OpenFlow port statistics; on a P4 switch
the program's reply_bytes of the backend on that port; each driver's read_port_bytes,
sampled into the ledger with the tenant counters) bound what it streamed. A streamed completion
sends one SSE event per token, and an event is never shorter than a floor: the
emulator's smallest is 224 bytes (model "m"), vLLM's compact chunks ~190; the default
floor MIN_BYTES_PER_TOKEN = 150 leaves room for a shorter id and model name. So

    completion tokens billed in a window  x  min_bytes_per_token  <=  bytes the port sent

must hold for every honest backend that streams. Bytes count over a longer window than
billing (`lag_s` more: a request's tokens are billed when it ends, after its bytes
flowed, so `lag_s` must cover the longest request), so with steady traffic of r bytes
per token a backend billing f times what it streamed is flagged when
f x min_bytes_per_token x window_s > r x (window_s + lag_s): with the defaults
(window 120 s, lag 60 s) f > 1.5 r / min_bytes_per_token, i.e. a 3x liar whose stream
has r < 2 x the floor (the emulator: r ~ 1.5 on the wire). Several backends on one
port are checked together. The byte window ends 1.5 counter intervals after the billing
window (the sample that counted the last bytes); the periodic check therefore looks at
the window that ended that long ago. Bytes count from the port's last sample before the
byte window (so a verdict needs one sample before and one in the window).
Not covered: non-streamed responses (a few bytes per token: set min_bytes_per_token to
0 to switch the check off where they are common).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_BYTES_PER_TOKEN = 150
CROSSCHECK_INTERVAL_S = 30.0  # a check every this long
WINDOW_S = 120.0  # over this much billing
LAG_S = 60.0  # bytes from this much before the billing window: the longest request


@dataclass
class BackendCheck:
    """One switch port (the backends on it) over one window."""

    switch: str
    port: int
    backends: list[str]
    since: float
    until: float
    completion_tokens: int
    bytes_sent: int
    bytes_needed: int
    samples: int
    fits: bool | None  # None: no sample of the port before and in the window (no verdict)
    detail: str = ""


@dataclass
class CheckSettings:
    min_bytes_per_token: int = MIN_BYTES_PER_TOKEN
    interval_s: float = CROSSCHECK_INTERVAL_S
    window_s: float = WINDOW_S
    lag_s: float = LAG_S
    flags: dict[str, int] = field(default_factory=dict)  # backend -> windows it was flagged
    first_flagged: dict[str, float] = field(default_factory=dict)  # backend -> unix time
    checks: int = 0  # periodic checks run
    verdicts: dict[str, int] = field(default_factory=dict)  # backend -> windows with one

    def settle_s(self, counter_interval_s: float) -> float:
        """How long after a window its bytes may still arrive in a port sample."""
        return 1.5 * counter_interval_s


def check_ports(billed: dict[str, tuple[int, int]], ports: dict[str, tuple[str, int]],
                growth: dict[tuple[str, int], tuple[int, int]], since: float, until: float,
                min_bytes_per_token: int) -> list[BackendCheck]:
    """`billed`: backend -> (prompt, completion) in [since, until); `ports`: backend ->
    (switch, port); `growth`: (switch, port) -> (bytes received, samples) over the byte
    window. One check per port that has a backend billing or sampled bytes."""
    by_port: dict[tuple[str, int], list[str]] = {}
    for backend, where in sorted(ports.items()):
        by_port.setdefault(where, []).append(backend)
    out = []
    for (switch, port), backends in sorted(by_port.items()):
        tokens = sum(billed.get(b, (0, 0))[1] for b in backends)
        sent, samples = growth.get((switch, port), (0, 0))
        if not tokens and not samples:
            continue
        needed = tokens * min_bytes_per_token
        fits = None if samples < 1 or min_bytes_per_token <= 0 else needed <= sent
        detail = ""
        if fits is False:
            detail = (f"{'+'.join(backends)} billed {tokens} completion tokens; at >= "
                      f"{min_bytes_per_token} bytes per streamed token that is >= {needed} "
                      f"bytes, but {switch} port {port} received only {sent}")
        out.append(BackendCheck(switch, port, backends, since, until, tokens, sent, needed,
                                samples, fits, detail))
    return out
