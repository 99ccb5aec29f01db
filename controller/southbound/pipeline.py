"""The switch's P4 program: find out what it runs, push ours when it differs.

A push (SetForwardingPipelineConfig) wipes the switch's registers — connection
table, token buckets, load — so it happens only when the cookie the switch
reports differs from ours, and only from the primary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from p4.config.v1 import p4info_pb2
from p4.v1 import p4runtime_pb2

from tokenfabric.controller.southbound.errors import PipelineError
from tokenfabric.controller.southbound.p4info import Pipeline
from tokenfabric.controller.southbound.rpc import Rpc

log = logging.getLogger(__name__)


_Get = p4runtime_pb2.GetForwardingPipelineConfigRequest


@dataclass(frozen=True)
class PipelineState:
    """What a switch runs after `ensure_pipeline`."""

    pushed: bool  # this call pushed our program
    installed_cookie: int | None
    adopted_p4info: p4info_pb2.P4Info | None = None  # the switch's own, when we have none


async def ensure_pipeline(rpc: Rpc, pipeline: Pipeline | None, is_primary: bool) \
        -> PipelineState:
    """Push `pipeline` unless the switch runs it (same cookie) or we are backup; with no
    pipeline of ours, adopt the P4Info the switch runs."""
    if pipeline is None:
        # Adopt the switch's program (a controller given no program, or a reader).
        config = await rpc.get_pipeline(_Get.P4INFO_AND_COOKIE)
        if config is None or not config.HasField("p4info"):
            raise PipelineError(f"switch {rpc.switch} runs no P4 program and none was given")
        cookie = config.cookie.cookie if config.HasField("cookie") else None
        return PipelineState(False, cookie, config.p4info)
    config = await rpc.get_pipeline(_Get.COOKIE_ONLY)
    installed = config.cookie.cookie if config is not None and config.HasField("cookie") \
        else None
    if installed == pipeline.cookie:
        log.info("switch %s: pipeline cookie %#x already installed", rpc.switch, installed)
        return PipelineState(False, installed)
    if not is_primary:
        log.info("switch %s: runs cookie %s, not ours, but we are backup: not pushing",
                 rpc.switch, installed)
        return PipelineState(False, installed)
    wanted = p4runtime_pb2.ForwardingPipelineConfig(
        p4info=pipeline.p4info, p4_device_config=pipeline.device_config)
    wanted.cookie.cookie = pipeline.cookie
    await rpc.set_pipeline(wanted)
    log.info("switch %s: pushed pipeline cookie %#x (was %s)", rpc.switch, pipeline.cookie,
             None if installed is None else hex(installed))
    return PipelineState(True, pipeline.cookie)
