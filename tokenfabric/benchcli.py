"""`tokenfabric bench`: run the benchmarks of a source checkout's bench/ folder."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import click

from tokenfabric import exitcodes

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def bench_args(doc: str, **defaults: float) -> argparse.Namespace:
    """A benchmark's command line: the first line of its docstring as the description,
    and one `--name` option per default, of the default's type (int or float)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return parser.parse_args()


def available() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


@click.command("bench")
@click.argument("names", nargs=-1)
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
def bench_command(names: tuple[str, ...], list_only: bool) -> None:
    """Run benchmarks (all, or NAMES); each prints its result as a ratio to a baseline."""
    known = available()
    if not known:
        click.echo(f"no benchmarks found in {BENCH_DIR} (they ship with a source checkout)",
                   err=True)
        raise SystemExit(exitcodes.MISSING)
    if list_only:
        click.echo("\n".join(known))
        return
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise click.UsageError(f"unknown benchmark(s) {', '.join(unknown)}; "
                               f"choose from {', '.join(known)}")
    failed = []
    for name in names or known:
        click.echo(f"== {name}")
        done = subprocess.run([sys.executable, str(BENCH_DIR / f"bench_{name}.py")], check=False)
        if done.returncode not in (exitcodes.OK, exitcodes.MISSING):
            failed.append(name)
    if failed:
        click.echo(f"failed: {', '.join(failed)}", err=True)
        raise SystemExit(exitcodes.FAILED)
