"""From the load generator's JSON lines to numbers, plots and a markdown summary.

Definitions (docs/lab.md repeats them):
- a request *attains its SLO* when it succeeded (HTTP 200, stream ended with
  [DONE]) and its TTFT and time per output token are within its tenant's SLO;
  failed and shed (429) requests count as misses;
- *SLO attainment* is the share of all sent requests that attained it;
- *goodput* is requests per second that attained it (and output tokens per
  second of those), over the span of the run, as in DistServe (Zhong et al., OSDI 2024).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenfabric.lab.capture import HostEvidence

log = logging.getLogger(__name__)


@dataclass
class Summary:
    group: str
    requests: int
    ok: int
    errors: dict[str, int]
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    slo_attainment: float | None
    goodput_rps: float
    goodput_tps: float
    throughput_rps: float
    backends: dict[str, int] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)  # e.g. mode, offered load

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every well-formed record of a JSON lines file; a broken line is logged and skipped."""
    records, bad = [], 0
    with Path(path).open() as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(record, dict) and "id" in record:
                records.append(record)
            else:
                bad += 1
    if bad:
        log.warning("%s: skipped %d malformed line(s)", path, bad)
    return records


def attains_slo(record: dict[str, Any]) -> bool:
    if not record.get("ok") or record.get("ttft") is None:
        return False
    if record["ttft"] * 1000 > record.get("slo_ttft_ms", float("inf")):
        return False
    tpot = record.get("tpot")
    return tpot is None or tpot * 1000 <= record.get("slo_tpot_ms", float("inf"))


def _percentile(values: Sequence[float], q: float, scale: float) -> float | None:
    return float(np.percentile(np.asarray(values), q) * scale) if values else None


def p99_ratio_interval(values: Sequence[float], baseline: Sequence[float],
                       confidence: float = 0.9, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float, float] | None:
    """p99(values) / p99(baseline) and its bootstrap confidence interval (percentile
    method; both samples resampled): (ratio, low, high), None if either is empty.

    How wide the interval is says how much a p99 of a few hundred requests can be trusted.
    """
    if not len(values) or not len(baseline):
        return None
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    rng = np.random.default_rng(seed)
    ra = np.percentile(rng.choice(a, (resamples, a.size)), 99, axis=1)
    rb = np.percentile(rng.choice(b, (resamples, b.size)), 99, axis=1)
    ratios = ra / np.maximum(rb, 1e-12)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(np.percentile(a, 99) / max(np.percentile(b, 99), 1e-12)), float(low), \
        float(high)


def span_of(records: Sequence[dict[str, Any]]) -> float:
    """Seconds from the first request's start to the last one's end."""
    starts = [r["start"] for r in records if r.get("start") is not None]
    ends = [r["start"] + (r.get("e2e") or 0) for r in records if r.get("start") is not None]
    return max(ends) - min(starts) if starts else 0.0


def error_kind(record: dict[str, Any]) -> str:
    error = record.get("error") or "none"
    return error.split(":")[0]


def summarize(records: Sequence[dict[str, Any]], group: str = "all",
              duration: float | None = None, labels: dict[str, Any] | None = None) -> Summary:
    """Percentiles, SLO attainment and goodput of one group of records."""
    duration = duration if duration and duration > 0 else span_of(records)
    ok = [r for r in records if r.get("ok")]
    good = [r for r in records if attains_slo(r)]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tpot = [r["tpot"] for r in ok if r.get("tpot") is not None]
    e2e = [r["e2e"] for r in ok if r.get("e2e") is not None]
    per_second = 1.0 / duration if duration > 0 else 0.0
    return Summary(
        group=group, requests=len(records), ok=len(ok),
        errors=dict(Counter(error_kind(r) for r in records if not r.get("ok"))),
        ttft_p50_ms=_percentile(ttft, 50, 1000), ttft_p90_ms=_percentile(ttft, 90, 1000),
        ttft_p99_ms=_percentile(ttft, 99, 1000),
        tpot_p50_ms=_percentile(tpot, 50, 1000), tpot_p99_ms=_percentile(tpot, 99, 1000),
        e2e_p50_s=_percentile(e2e, 50, 1), e2e_p99_s=_percentile(e2e, 99, 1),
        slo_attainment=len(good) / len(records) if records else None,
        goodput_rps=len(good) * per_second,
        goodput_tps=sum(r.get("output_tokens") or 0 for r in good) * per_second,
        throughput_rps=len(ok) * per_second,
        backends=dict(Counter(str(r.get("backend")) for r in ok)),
        labels=dict(labels or {}),
    )


def summarize_by(records: Sequence[dict[str, Any]], key: str = "tenant",
                 duration: float | None = None,
                 labels: dict[str, Any] | None = None) -> list[Summary]:
    """One summary for all records, then one per value of `key` (tenant, class, backend)."""
    duration = duration if duration and duration > 0 else span_of(records)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[str(record.get(key))].append(record)
    out = [summarize(records, "all", duration, labels)]
    if len(groups) > 1:
        out += [summarize(groups[name], name, duration, labels) for name in sorted(groups)]
    return out


# The share of the requests the policy did not shed (429) that must succeed for a run to
# pass, unless the experiment states its own (failover) or --min-ok another.
DEFAULT_MIN_OK = 0.95
SHED = "http_429"  # error_kind of a request the policy shed by design (overflow responder)


@dataclass(frozen=True)
class Verdict:
    """Whether one group of a run did what it should: `ok` of `counted` requests (those
    the policy did not shed; planned requests that never finished count as failed)."""

    group: str
    ok: int
    counted: int
    shed: int
    expected: float

    @property
    def share(self) -> float | None:
        return self.ok / self.counted if self.counted else None

    @property
    def passed(self) -> bool:
        # nothing to judge (no request, or every one shed) is a failure, not a pass
        return self.share is not None and self.share >= self.expected

    def text(self) -> str:
        if not self.counted:
            what = ("no request was recorded" if not self.shed else
                    f"every one of {self.shed} requests was shed (429): nothing to judge")
            return f"{self.group}: FAILED, {what}"
        mark = "PASSED" if self.passed else "FAILED"
        sign = ">=" if self.passed else "<"
        return (f"{self.group}: {mark}, {self.ok} of {self.counted} requests not shed by "
                f"the policy succeeded ({self.share:.1%} {sign} {self.expected:.0%})")


def verdict(summary: Summary, expected: float, planned: int | None = None) -> Verdict:
    """The verdict of one summary; `planned` requests that left no record count as failed."""
    shed = summary.errors.get(SHED, 0)
    total = max(summary.requests, planned or 0)
    return Verdict(summary.group, summary.ok, total - shed, shed, expected)


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}:{v}" for k, v in sorted(value.items())) or "–"
    return str(value)


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else _cell(value)


SUMMARY_COLUMNS = [
    ("requests", "requests", 0), ("ok", "ok", 0), ("ttft_p50_ms", "TTFT p50 ms", 1),
    ("ttft_p99_ms", "TTFT p99 ms", 1), ("tpot_p50_ms", "TPOT p50 ms", 1),
    ("e2e_p99_s", "E2E p99 s", 2), ("slo_attainment", "SLO att.", 3),
    ("goodput_rps", "goodput req/s", 2), ("goodput_tps", "goodput tok/s", 0),
    ("errors", "errors", 0),
]


def markdown_table(summaries: Iterable[Summary], label_keys: Sequence[str] = ()) -> str:
    """A GitHub-flavoured markdown table, one row per summary."""
    summaries = list(summaries)
    header = [*label_keys, "group", *(title for _, title, _ in SUMMARY_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        row = [_label(s.labels.get(k)) for k in label_keys] + [s.group]
        row += [_cell(getattr(s, name), digits) for name, _, digits in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (labs run headless and as root)
    import matplotlib.pyplot as plt

    return plt


def plot_ttft_cdf(series: dict[str, Sequence[dict[str, Any]]], path: str | Path,
                  title: str = "TTFT") -> Path:
    """One CDF line of TTFT per named series of records."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, records in series.items():
        values = np.sort([r["ttft"] * 1000 for r in records
                          if r.get("ok") and r.get("ttft") is not None])
        if values.size:
            ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name)
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_timeline(records: Sequence[dict[str, Any]], path: str | Path,
                  title: str = "requests over time", marks: dict[str, float] | None = None
                  ) -> Path:
    """TTFT of each request against its start time, one colour per backend; failures as x.

    `marks` draws vertical lines at named offsets (seconds), e.g. a backend kill.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    t0 = min((r["start"] for r in records), default=0.0)
    by_backend: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("ok") and r.get("ttft") is not None:
            by_backend[str(r.get("backend"))].append(r)
    for backend in sorted(by_backend):
        rows = by_backend[backend]
        ax.scatter([r["start"] - t0 for r in rows], [r["ttft"] * 1000 for r in rows], s=6,
                   label=backend)
    failed = [r for r in records if not r.get("ok")]
    if failed:
        ax.scatter([r["start"] - t0 for r in failed], [0] * len(failed), marker="x", s=14,
                   color="black", label="failed")
    for name, at in (marks or {}).items():
        ax.axvline(at, color="red", linestyle="--", linewidth=1)
        ax.annotate(name, (at, ax.get_ylim()[1]), color="red", fontsize=8, ha="left",
                    va="top")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if by_backend or failed:
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_sweep(summaries: Sequence[Summary], x_label: str, series_label: str,
               metrics: Sequence[tuple[str, str]], path: str | Path,
               x_title: str = "offered load (fraction of capacity)") -> Path:
    """One panel per metric against `x_label`, one line per value of `series_label`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    series: dict[str, list[Summary]] = defaultdict(list)
    for s in summaries:
        series[str(s.labels.get(series_label))].append(s)
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        for name in sorted(series):
            points = sorted((s.labels[x_label], getattr(s, metric)) for s in series[name]
                            if getattr(s, metric) is not None)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xlabel(x_title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def report(jsonl: str | Path, out_dir: str | Path, title: str = "run",
           duration: float | None = None, group_by: str = "tenant") -> str:
    """Summary table, TTFT CDF and timeline of one JSON lines file; returns the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(jsonl)
    summaries = summarize_by(records, group_by, duration)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[str(r.get(group_by))].append(r)
    plot_ttft_cdf(dict(groups), out / "ttft_cdf.png", f"{title}: TTFT by {group_by}")
    plot_timeline(records, out / "timeline.png", f"{title}: TTFT over time by backend")
    text = f"# {title}\n\n{markdown_table(summaries)}"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps([s.as_dict() for s in summaries], indent=2))
    return text


def failover_stats(records: Sequence[dict[str, Any]], killed_at: float, backend: str,
                   evidence: HostEvidence | None = None) -> dict[str, float]:
    """Experiment c: what a backend killed at epoch `killed_at` cost.

    "Reached the dead backend" takes real evidence only: a SYN to the VIP seen on the dead
    host's interface (`evidence`, its packet capture), or a response naming it in
    X-Tokenfabric-Backend. The measure is the time from its last LOAD beacon (also from
    the capture; the kill time without one) to the last such connection. Refused
    connections (nothing listens any more) are failures, counted on their own: the
    client cannot tell which backend refused them.
    """
    after = [r for r in records if r.get("start", 0) >= killed_at]
    inflight = [r for r in records if r.get("start", 0) < killed_at
                and r["start"] + (r.get("e2e") or 0) >= killed_at]
    last_beacon = max(evidence.load_beacons if evidence else [], default=killed_at)
    served = [r["start"] for r in records if r.get("backend") == backend
              and r.get("start", 0) >= last_beacon]
    syns = [t for t in (evidence.syns if evidence else []) if t > last_beacon]
    last = max(served + syns, default=None)
    return {
        "failed requests": float(sum(not r.get("ok") for r in after + inflight)),
        "failed in flight at the kill": float(sum(not r.get("ok") for r in inflight)),
        "refused connections after the kill": float(sum(
            not r.get("ok") and error_kind(r) == "connect" for r in after)),
        "last LOAD beacon before the kill (ms)": (last_beacon - killed_at) * 1000,
        "SYNs reaching it after its last beacon": float(len(syns)),
        "responses served by it after its last beacon": float(len(served)),
        "last new connection after its last beacon (ms)":
            max(0.0, (last - last_beacon) * 1000) if last is not None else 0.0,
    }


def failover_markdown(backend: str, stats: dict[str, float], evidence: str = "") -> str:
    lines = [f"| backend {backend} killed{f' ({evidence})' if evidence else ''} | value |",
             "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" if "ms" in k else f"| {k} | {v:.0f} |"
              for k, v in stats.items()]
    return "\n".join(lines) + "\n"


def crosscheck_markdown(summary: dict[str, Any]) -> str:
    """The controller's billing cross-check over the run (crosscheck.json): windows
    checked, and per backend the windows that judged it and those that flagged it.
    Counts are the controller's since it started (all runs of the experiment so far)."""
    liar = summary.get("liar")
    lines = [f"billing cross-check (controller/crosscheck.py; every {summary['interval_s']:g} s"
             f" over {summary['window_s']:g} s, floor {summary['min_bytes_per_token']} bytes"
             f"/token): {summary['checks']} windows checked so far"]
    for name, b in sorted(summary.get("backends", {}).items()):
        role = " (lying agent, 3x)" if name == liar else ""
        first = b.get("first_flagged")
        after = "" if first is None else \
            f", first {first - summary['run_started']:.1f} s after the load started"
        lines.append(f"- {name}{role}: {b['verdicts']} windows judged its billing, {b['flagged']} "
                     f"flagged{after}")
    return "\n".join(lines) + "\n"
