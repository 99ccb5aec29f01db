"""The `tokenfabric` command: one entry point, one subcommand per role.

Subcommands are imported only when they run, so that an install with just
the `agent` extra can run `tokenfabric agent` without the controller's
P4Runtime stack, and a missing extra is reported instead of a traceback.
"""

from __future__ import annotations

import importlib

import click

from tokenfabric import __version__, exitcodes
from tokenfabric.logs import setup_logging

# The modules behind the subcommands: module -> (the extra that provides its dependencies,
# {subcommand: (attribute, help line shown when that extra is missing)}).
MODULES: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "tokenfabric.doctor": ("", {"doctor": ("doctor", "Check the external pieces the roles need.")}),
    "tokenfabric.controller.cli": ("controller", {
        "controller": ("controller_group",
                       "Run the controller (P4Runtime southbound, REST API, ledger)."),
        "policy": ("policy_group", "Validate QoS policy files."),
        "switch": ("switch_group", "Inspect a switch (p4runtime-shell as a non-primary client)."),
    }),
    "tokenfabric.controller.ledger_cli": ("controller", {
        "ledger": ("ledger_group",
                   "Verify the token ledger's hash chain and signatures; tenants' statements."),
    }),
    "tokenfabric.hostagent.cli": ("agent", {
        "agent": ("agent_group", "Run the host agent (bridge, beacons, reports) beside vLLM."),
        "vllm-emulator": ("emulator_command", "Serve an OpenAI-compatible vLLM emulator."),
    }),
    "tokenfabric.lab.cli": ("lab", {"lab": ("lab_group", "Run Mininet lab experiments.")}),
    "tokenfabric.benchcli": ("", {"bench": ("bench_command", "Run the benchmarks under bench/.")}),
}
# subcommand -> (module, attribute, extra, help line)
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    name: (module, attr, extra, help_line)
    for module, (extra, commands) in MODULES.items()
    for name, (attr, help_line) in commands.items()}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = SUBCOMMANDS.get(cmd_name)
        if spec is None:
            return None
        module_name, attr, extra, help_line = spec
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            return _missing_extra_command(cmd_name, extra, help_line, exc)
        return getattr(module, attr)


def _missing_extra_command(name: str, extra: str, help_line: str,
                           exc: ImportError) -> click.Command:
    @click.command(name, help=help_line, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def missing(args: tuple[str, ...]) -> None:
        hint = f"pip install 'tokenfabric[{extra}]'" if extra else "reinstall tokenfabric"
        click.echo(f"tokenfabric {name}: cannot load ({exc}). Install it with: {hint}", err=True)
        raise SystemExit(exitcodes.MISSING)

    return missing


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokenfabric")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              envvar="TOKENFABRIC_LOG_LEVEL", help="Log level for every component.")
def main(log_level: str) -> None:
    """tokenfabric: steer LLM inference traffic inside the network.

    P4 switches classify and steer requests to vLLM backends by load and QoS
    contracts; the controller programs them over P4Runtime; host agents bridge
    the fabric to vLLM. Exit codes: 0 ok, 1 failed, 2 usage, 3 something
    needed is missing, 4 an input file did not validate.
    """
    setup_logging(log_level)


if __name__ == "__main__":
    main()
