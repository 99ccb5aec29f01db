"""Where token_router.p4's build lives, and the values code derives from its P4Info.

The names and numbers themselves (tables, actions, counters, sizes, drop reasons,
events, modes, colours) are generated from the P4Info and defines.p4 into
tokenfabric/p4names.py by p4src/build.sh. docs/dataplane.md explains them.
"""

from __future__ import annotations

from pathlib import Path

from tokenfabric.p4names import ACTION_PARAMS, Actions

P4SRC = Path(__file__).resolve().parent.parent / "p4src"
BUILD = P4SRC / "build"
TOKEN_ROUTER_JSON = BUILD / "token_router.json"
TOKEN_ROUTER_P4INFO = BUILD / "token_router.p4info.txtpb"
FORWARD_JSON = BUILD / "forward.json"
FORWARD_P4INFO = BUILD / "forward.p4info.txtpb"

# A service has pair_mask + 1 P2C slots, pair_mask being set_service's parameter.
MAX_PAIR_SLOTS = 1 << ACTION_PARAMS[Actions.SET_SERVICE]["pair_mask"]
