"""Results of the same experiment from several `lab run` folders, side by side.

Made for one experiment run on two dataplanes (BMv2 and Open vSwitch): one markdown
table per (mode, load) with each folder's figures for all tenants together, and one
sweep plot with a line per mode and dataplane. Reads only experiment.json and
summary.json of each folder (what `lab run` and `lab summarize` write).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenfabric.lab import results

# (Summary field, column title, digits) shown per folder
COLUMNS = [("ok", "ok/requests", 0), ("ttft_p50_ms", "TTFT p50 ms", 1),
           ("ttft_p99_ms", "TTFT p99 ms", 1), ("slo_attainment", "SLO att.", 3),
           ("goodput_rps", "goodput req/s", 2)]


class CompareError(ValueError):
    """A folder is not a lab results folder, or the folders ran different experiments."""


@dataclass
class LabResult:
    folder: Path
    experiment: str
    topo: str
    dataplane: str
    duration: float
    summaries: list[results.Summary]
    label: str = ""


def load_result(folder: Path) -> LabResult:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "experiment.json").read_text())
        rows = json.loads((folder / "summary.json").read_text())
    except FileNotFoundError as exc:
        raise CompareError(f"{folder}: not a lab results folder (no {Path(exc.filename).name}"
                           "; `tokenfabric lab summarize` rebuilds summary.json)") from None
    except json.JSONDecodeError as exc:
        raise CompareError(f"{folder}: broken JSON: {exc}") from None
    try:
        summaries = [results.Summary(**row) for row in rows]
        return LabResult(folder, meta["experiment"], meta["topo"],
                         meta.get("dataplane", "bmv2"),  # folders from before --dataplane
                         float(meta["duration"]), summaries)
    except (KeyError, TypeError) as exc:
        raise CompareError(f"{folder}: unexpected results format: {exc}") from None


def _labels(found: list[LabResult]) -> None:
    """Each result's column label: its dataplane, or the folder name where they repeat."""
    planes = [r.dataplane for r in found]
    for r in found:
        r.label = r.dataplane if planes.count(r.dataplane) == 1 else r.folder.name


def compare(folders: list[Path], out_dir: Path | None = None) -> str:
    """The markdown comparison (also written to <out_dir>/comparison.md with a sweep plot)."""
    if len(folders) < 2:
        raise CompareError("give at least two results folders")
    found = [load_result(f) for f in folders]
    if len({r.experiment for r in found}) > 1:
        raise CompareError("the folders ran different experiments: " + ", ".join(
            f"{r.folder.name}: {r.experiment}" for r in found))
    _labels(found)
    first = found[0]
    lines = [f"# {first.experiment}: " + " vs ".join(r.label for r in found) + "\n"]
    for r in found:
        lines.append(f"- {r.label}: `{r.folder}` (topology {r.topo}, {r.duration:g} s per run)")
    header = ["mode", "load"] + [f"{r.label} {title}" for _, title, _ in COLUMNS
                                 for r in found]
    lines += ["", "all tenants together:", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys: list[tuple[str, float]] = []
    by_key: dict[tuple[str, float], dict[str, results.Summary]] = {}
    for r in found:
        for s in r.summaries:
            if s.group != "all":
                continue
            key = (str(s.labels.get("mode")), float(s.labels.get("load", 0)))
            if key not in by_key:
                keys.append(key)
                by_key[key] = {}
            by_key[key][r.label] = s
    for key in keys:
        row = [key[0], f"{key[1]:g}"]
        for name, _, digits in COLUMNS:
            for r in found:
                cell = by_key[key].get(r.label)
                row.append("–" if cell is None else _cell(cell, name, digits))
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if len({k[1] for k in keys}) > 1:
            merged = [_relabel(s, r.label) for r in found for s in r.summaries
                      if s.group == "all"]
            results.plot_sweep(merged, "load", "series", [
                ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
                ("slo_attainment", "SLO attainment"), ("goodput_rps", "goodput (req/s)")],
                out_dir / "comparison.png")
            text += "\n![comparison](comparison.png)\n"
        (out_dir / "comparison.md").write_text(text)
    return text


def _cell(s: results.Summary, name: str, digits: int) -> str:
    if name == "ok":
        return f"{s.ok}/{s.requests}"
    value: Any = getattr(s, name)
    return "–" if value is None else f"{value:.{digits}f}"


def _relabel(s: results.Summary, label: str) -> results.Summary:
    copy = results.Summary(**s.as_dict())
    copy.labels = {**s.labels, "series": f"{s.labels.get('mode')} ({label})"}
    return copy
