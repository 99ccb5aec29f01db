"""What counts as one generated token in an OpenAI-compatible SSE stream.

One rule for every reader of a stream, so that the bridge (hostagent/bridge.py, which
bills by it) and the load generator (tokenfabric/lab/loadgen.py, which measures by it)
count the same tokens: vLLM sends one `data:` chunk per generated token, with empty
text while a multi-byte character is still incomplete. The chat stream's opening chunk
(the assistant role) and a usage-only chunk (no choices) carry no token.
"""

from __future__ import annotations

import json
from typing import Any


def is_token_chunk(event: Any) -> bool:
    """Whether a decoded `data:` event carries a generated token."""
    if not isinstance(event, dict):
        return False
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if "text" in choice or (isinstance(delta, dict) and "role" not in delta):
            return True
    return False


def is_token_payload(body: bytes) -> bool:
    """`is_token_chunk` of a `data:` payload still in bytes (not JSON: no token)."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return is_token_chunk(event)
