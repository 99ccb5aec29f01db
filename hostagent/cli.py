"""Command line of the host agent: `tokenfabric agent ...` and `tokenfabric vllm-emulator`."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import click

from tokenfabric import exitcodes

if TYPE_CHECKING:
    from tokenfabric.hostagent.config import AgentConfig


def _run_until_signal(make_coro: Callable[[asyncio.Event], Awaitable[None]],
                      use_uvloop: bool = True) -> None:
    """Run the coroutine built by `make_coro(stop_event)`; SIGINT/SIGTERM set the event."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await make_coro(stop)

    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass  # the standard event loop then
        else:
            uvloop.run(main())
            return
    asyncio.run(main())


def _serve_or_fail(prog: str, make_coro: Callable[[asyncio.Event], Awaitable[None]],
                   failures: dict[type[Exception], Callable[[Any], str]]) -> None:
    """Run until a signal; an expected failure (the first kind in `failures` it is)
    prints `prog: message` and exits FAILED, without a traceback."""
    try:
        _run_until_signal(make_coro)
    except tuple(failures) as exc:
        message = next(say for kind, say in failures.items() if isinstance(exc, kind))
        click.echo(f"{prog}: {message(exc)}", err=True)
        sys.exit(exitcodes.FAILED)


@click.command("vllm-emulator")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model", default="emulated-llama", show_default=True,
              help="The model name served (and the model_name label of /metrics).")
@click.option("--max-model-len", default=8192, show_default=True, type=click.IntRange(2))
@click.option("--default-max-tokens", default=64, show_default=True, type=click.IntRange(1),
              help="Output length of a request that gives no max_tokens.")
@click.option("--max-num-seqs", default=256, show_default=True, type=click.IntRange(1))
@click.option("--backend-name", default="", help="Name every response in an "
              "X-Tokenfabric-Backend header (as the host agent's bridge does).")
@click.option("--scheduling-policy", type=click.Choice(["fcfs", "priority"]), default="fcfs",
              show_default=True, help="As vLLM's: priority serves lower `priority` first.")
@click.option("--kv-cache-tokens", default=430_000, show_default=True, type=click.IntRange(16),
              help="KV cache size in tokens (A100-80GB with Llama-3-8B: ~430k).")
@click.option("--block-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--prefill-ms-per-token", default=0.1, show_default=True,
              type=click.FloatRange(0))
@click.option("--decode-base-ms", default=10.0, show_default=True, type=click.FloatRange(0))
@click.option("--decode-ms-per-seq", default=0.05, show_default=True, type=click.FloatRange(0))
@click.option("--decode-us-per-ctx-token", default=0.086, show_default=True,
              type=click.FloatRange(0))
@click.option("--no-prefix-caching", is_flag=True, help="Disable the prefix cache.")
@click.option("--prefix-caching-hash-algo", default="sha256", show_default=True,
              type=click.Choice(["sha256", "sha256_cbor"]),
              help="vLLM's block hash algorithm (the KV events carry these hashes).")
@click.option("--kv-events-config", default=None,
              help="vLLM's KV events config as JSON, e.g. '{\"enable_kv_cache_events\": "
                   "true, \"endpoint\": \"tcp://127.0.0.1:5557\", \"replay_endpoint\": "
                   "\"tcp://127.0.0.1:5558\"}': publish BlockStored/BlockRemoved/"
                   "AllBlocksCleared as vLLM does.")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Speed multiplier of the emulated GPU (0.5: twice as slow).")
@click.option("--legacy-metrics", is_flag=True,
              help="Export the older names (vllm:gpu_cache_usage_perc, "
                   "vllm:time_per_output_token_seconds).")
@click.option("--fault", default="none", show_default=True,
              type=click.Choice(["none", "crash", "hang", "slow", "503"]),
              help="Inject a fault (after --fault-after seconds).")
@click.option("--fault-after", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--fault-factor", default=4.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Slow-down factor of the `slow` fault.")
def emulator_command(host: str, port: int, model: str, max_model_len: int,
                     default_max_tokens: int, max_num_seqs: int, backend_name: str,
                     scheduling_policy: str,
                     kv_cache_tokens: int,
                     block_size: int, prefill_ms_per_token: float, decode_base_ms: float,
                     decode_ms_per_seq: float, decode_us_per_ctx_token: float,
                     no_prefix_caching: bool, prefix_caching_hash_algo: str,
                     kv_events_config: str | None, speed: float, legacy_metrics: bool, fault: str,
                     fault_after: float, fault_factor: float) -> None:
    """Serve an OpenAI-compatible vLLM emulator (continuous-batching timing model)."""
    from tokenfabric.hostagent.emulator import EmulatorConfig, serve
    from tokenfabric.hostagent.engine import EngineParams
    from tokenfabric.hostagent.kv_events import KvEventsConfig

    try:
        params = EngineParams(
            max_num_seqs=max_num_seqs, kv_cache_tokens=kv_cache_tokens, block_size=block_size,
            prefill_s_per_token=prefill_ms_per_token / 1e3, decode_base_s=decode_base_ms / 1e3,
            decode_s_per_seq=decode_ms_per_seq / 1e3,
            decode_s_per_ctx_token=decode_us_per_ctx_token / 1e6,
            prefix_caching=not no_prefix_caching, speed=speed,
            scheduling_policy=scheduling_policy, hash_algo=prefix_caching_hash_algo)
        kv_events = KvEventsConfig.from_json(kv_events_config) if kv_events_config else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    config = EmulatorConfig(model=model, max_model_len=max_model_len,
                            default_max_tokens=default_max_tokens,
                            legacy_metrics=legacy_metrics, engine=params,
                            backend_name=backend_name, kv_events=kv_events)
    from tokenfabric.hostagent.kv_events import KvEventsError
    _serve_or_fail("vllm-emulator",
                   lambda stop: serve(config, host, port, fault, fault_factor, fault_after, stop),
                   {KvEventsError: str,
                    OSError: lambda exc: f"cannot listen on {host}:{port}: {exc.strerror}"})


@click.group("agent")
def agent_group() -> None:
    """The host agent: bridge, beacons, reports, host setup, RoCE QoS."""


def _load_config(path: str | None, flags: dict) -> AgentConfig:
    from tokenfabric.config import ConfigError
    from tokenfabric.hostagent.config import load

    try:
        return load(path, flags)
    except (ConfigError, OSError) as exc:
        click.echo(f"agent: {exc}", err=True)
        sys.exit(exitcodes.INVALID_INPUT)


@agent_group.command("keygen")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the new private key (PEM, mode 0600; never overwritten).")
@click.option("--name", default="AGENT-NAME", show_default=True,
              help="The token's name, for the tokens-file line printed.")
def keygen_command(key_path: str, name: str) -> None:
    """Make the Ed25519 key pair that signs this agent's usage records.

    Put the key's path in the agent config (`signing_key`) and the printed public key
    on the agent's token in the controller's tokens file (docs/rest.md)."""
    from tokenfabric.usage_signing import KeyFileError, generate_key_file

    try:
        public = generate_key_file(key_path)
    except KeyFileError as exc:
        click.echo(f"agent keygen: {exc}", err=True)
        sys.exit(exitcodes.FAILED)
    click.echo(f"private key: {key_path}  (agent config: signing_key: {key_path})")
    click.echo(f"public key:  {public}")
    click.echo("tokens file entry (controller):")
    click.echo(f'  <agent token>: {{name: {name}, role: agent, backends: [<backend names>], '
               f'public_key: "{public}"}}')


@agent_group.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="TOKENFABRIC_CONFIG", help="YAML file with an `agent:` section.")
@click.option("--controller-url", "controller_urls", multiple=True,
              help="Override agent.controller_url; repeat it for controller replicas "
                   "(agent.controller_urls; env TOKENFABRIC_AGENT__CONTROLLER_URLS).")
@click.option("--vllm-url", default=None, help="Override agent.vllm_url.")
@click.option("--listen-port", default=None, type=click.IntRange(0, 65535),
              help="Override agent.listen_port (the bridge).")
@click.option("--mode", default=None, type=click.Choice(["relay", "overflow"]),
              help="Override agent.mode.")
def run_command(config_path: str | None, controller_urls: tuple[str, ...],
                vllm_url: str | None,
                listen_port: int | None, mode: str | None) -> None:
    """Run the agent: bridge, beacons, registration and reports (until SIGTERM)."""
    from tokenfabric.hostagent.agent import run_agent
    from tokenfabric.hostagent.hostsetup import HostSetupError

    config = _load_config(config_path, {"controller_urls": list(controller_urls) or None,
                                        "vllm_url": vllm_url,
                                        "listen_port": listen_port, "mode": mode})
    _serve_or_fail("agent", lambda stop: run_agent(config, stop),
                   {HostSetupError: lambda exc: f"host set-up failed (nothing left changed): {exc}",
                    OSError: str})


@agent_group.command("host-setup")
@click.option("--vip", required=True, help="The service VIP to hold on lo.")
@click.option("--address", default=None, help="The host's fabric address (ipip local end).")
@click.option("--decap-interface", default="tfa-ipip0", show_default=True)
@click.option("--no-decap", is_flag=True, help="Skip the IP-in-IP decapsulation device.")
def host_setup_command(vip: str, address: str | None, decap_interface: str,
                       no_decap: bool) -> None:
    """Apply the host set-up, hold it until SIGINT/SIGTERM, then undo it."""
    import json

    from tokenfabric.hostagent.hostsetup import HostSetup, HostSetupError

    setup = HostSetup(vip, address, decap_interface, decap=not no_decap)
    try:
        status = setup.apply()
    except (HostSetupError, OSError) as exc:
        click.echo(f"host-setup failed (nothing left changed): {exc}", err=True)
        sys.exit(exitcodes.FAILED)
    click.echo(json.dumps(status), nl=True)
    sys.stdout.flush()

    async def hold(stop: asyncio.Event) -> None:
        await stop.wait()

    try:
        _run_until_signal(hold, use_uvloop=False)
    finally:
        setup.undo()
        click.echo("host-setup undone")


@agent_group.command("roce")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Take RoCE values from the `agent.roce` section of this file.")
@click.option("--dscp", type=click.IntRange(0, 63), default=None)
@click.option("--priority", type=click.IntRange(0, 7), default=None)
@click.option("--cnp-dscp", type=click.IntRange(0, 63), default=None)
@click.option("--cnp-priority", type=click.IntRange(0, 7), default=None)
@click.option("--no-ecn", is_flag=True, default=False)
@click.option("--no-pfc", is_flag=True, default=False)
@click.option("--netdev", default=None, help="Network device (default: each RDMA device's).")
@click.option("--rdma-dev", default=None, help="RDMA device (default: each found).")
@click.option("--dry-run", is_flag=True, help="Print the exact commands, change nothing.")
def roce_command(config_path: str | None, dscp: int | None, priority: int | None,
                 cnp_dscp: int | None, cnp_priority: int | None, no_ecn: bool, no_pfc: bool,
                 netdev: str | None, rdma_dev: str | None, dry_run: bool) -> None:
    """RoCEv2 QoS on this host: DSCP->priority, PFC, ECN, CNP DSCP."""
    from tokenfabric import yamlio
    from tokenfabric.hostagent import roce

    values: dict = {}
    if config_path:
        try:
            with open(config_path) as handle:
                section = (yamlio.load(handle) or {}).get("agent") or {}
            values = dict(section.get("roce") or {})
        except (OSError, yamlio.YAMLError, AttributeError, TypeError, ValueError) as exc:
            click.echo(f"roce: {config_path}: no readable agent.roce mapping: {exc}", err=True)
            sys.exit(exitcodes.INVALID_INPUT)
    for key, value in (("dscp", dscp), ("priority", priority), ("cnp_dscp", cnp_dscp),
                       ("cnp_priority", cnp_priority)):
        if value is not None:
            values[key] = value
    if no_ecn:
        values["ecn"] = False
    if no_pfc:
        values["pfc"] = False
    try:
        qos = roce.RoceQos.from_dict(values)
    except (TypeError, ValueError) as exc:
        click.echo(f"roce: {exc}", err=True)
        sys.exit(exitcodes.INVALID_INPUT)
    devices = roce.rdma_devices()
    if rdma_dev or netdev:
        devices = {rdma_dev or "rdma0": [netdev] if netdev else devices.get(rdma_dev or "", [])}
        if not any(devices.values()):
            click.echo(f"roce: no network device known for {rdma_dev}; name it with --netdev",
                       err=True)
            sys.exit(exitcodes.USAGE)
    if not devices:
        click.echo(f"no RDMA device found ({roce.SYS_INFINIBAND} is empty or absent): "
                   "nothing to apply. Name one with --netdev/--rdma-dev to see the commands.")
        return
    if dry_run:
        for dev, netdevs in devices.items():
            for nd in netdevs:
                click.echo(roce.render(roce.commands(qos, nd, dev)))
        return
    status = roce.apply(qos, devices)
    click.echo(status["message"])
    if status.get("failures"):
        sys.exit(exitcodes.FAILED)


@agent_group.command("scrape")
@click.option("--vllm-url", default="http://127.0.0.1:8000", show_default=True)
def scrape_command(vllm_url: str) -> None:
    """Scrape a vLLM /metrics once and print what the agent reads from it (JSON)."""
    import json

    import aiohttp

    from tokenfabric.hostagent.metrics import ScrapeError, scrape

    async def once() -> dict:
        async with aiohttp.ClientSession() as session:
            return (await scrape(session, vllm_url)).as_report()

    try:
        click.echo(json.dumps(asyncio.run(once()), indent=2))
    except ScrapeError as exc:
        click.echo(f"scrape: {exc}", err=True)
        sys.exit(exitcodes.FAILED)
