"""The controller's P4Runtime southbound (docs/southbound.md).

    sb = Southbound(election_id=20)
    pipeline = Pipeline.from_files("token_router.p4info.txtpb", "token_router.json")
    sb.add_switch("s1", "127.0.0.1:9559", device_id=0, pipeline=pipeline)
    await sb.start()
    results = await sb.apply({"s1": desired_state})   # writes only the difference
"""

from tokenfabric.controller.drivers import CounterValue, ReconcileResult, Role
from tokenfabric.controller.southbound.codec import Codec, decode_int, encode_int
from tokenfabric.controller.southbound.errors import (
    NotPrimaryError,
    PipelineError,
    SouthboundError,
    SwitchUnavailable,
    TranslationError,
    UpdateFailure,
    WriteError,
)
from tokenfabric.controller.southbound.fleet import ApplyError, Southbound
from tokenfabric.controller.southbound.p4info import (
    P4InfoIndex,
    Pipeline,
    load_p4info,
    pipeline_cookie,
)
from tokenfabric.controller.southbound.session import Election
from tokenfabric.controller.southbound.switch import Switch, SwitchConfig

__all__ = [
    "ApplyError", "Codec", "CounterValue", "Election", "NotPrimaryError", "P4InfoIndex",
    "PipelineError", "Pipeline", "ReconcileResult", "Role", "SouthboundError", "Southbound",
    "Switch", "SwitchConfig", "SwitchUnavailable", "TranslationError", "UpdateFailure",
    "WriteError", "decode_int", "encode_int", "load_p4info", "pipeline_cookie",
]
