"""Command line of the host agent: `tokenfabric agent ...` and `tokenfabric vllm-emulator`."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from tokenfabric import exitcodes


def _run_until_signal(make_coro, use_uvloop: bool = True) -> None:  # noqa: ANN001
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
            uvloop = None
        if uvloop is not None:
            uvloop.run(main())
            return
    asyncio.run(main())


@click.command("vllm-emulator")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model", default="emulated-llama", show_default=True,
              help="The model name served (and the model_name label of /metrics).")
@click.option("--max-model-len", default=8192, show_default=True, type=click.IntRange(2))
@click.option("--default-max-tokens", default=64, show_default=True, type=click.IntRange(1),
              help="Output length of a request that gives no max_tokens.")
@click.option("--max-num-seqs", default=256, show_default=True, type=click.IntRange(1))
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
                     default_max_tokens: int, max_num_seqs: int, kv_cache_tokens: int,
                     block_size: int, prefill_ms_per_token: float, decode_base_ms: float,
                     decode_ms_per_seq: float, decode_us_per_ctx_token: float,
                     no_prefix_caching: bool, speed: float, legacy_metrics: bool, fault: str,
                     fault_after: float, fault_factor: float) -> None:
    """Serve an OpenAI-compatible vLLM emulator (continuous-batching timing model)."""
    from hostagent.emulator import EmulatorConfig, serve
    from hostagent.engine import EngineParams

    try:
        params = EngineParams(
            max_num_seqs=max_num_seqs, kv_cache_tokens=kv_cache_tokens, block_size=block_size,
            prefill_s_per_token=prefill_ms_per_token / 1e3, decode_base_s=decode_base_ms / 1e3,
            decode_s_per_seq=decode_ms_per_seq / 1e3,
            decode_s_per_ctx_token=decode_us_per_ctx_token / 1e6,
            prefix_caching=not no_prefix_caching, speed=speed)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    config = EmulatorConfig(model=model, max_model_len=max_model_len,
                            default_max_tokens=default_max_tokens,
                            legacy_metrics=legacy_metrics, engine=params)
    try:
        _run_until_signal(lambda stop: serve(config, host, port, fault, fault_factor,
                                             fault_after, stop))
    except OSError as exc:
        click.echo(f"vllm-emulator: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        sys.exit(exitcodes.FAILED)


@click.group("agent")
def agent_group() -> None:
    """The host agent: bridge, beacons, reports, host setup, RoCE QoS."""
