"""The project's one YAML library: ruamel.yaml (YAML 1.2, libyaml through ruamel.yaml.clib).

Plain loading and dumping for configuration, token and lab files. The policy and fabric
files, which need each value's line, go through controller/policy/lineyaml.py, on the
same library.
"""

from __future__ import annotations

import io
from typing import IO, Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

__all__ = ["YAMLError", "dump", "load"]


def load(text: str | IO[str]) -> Any:
    """One document as plain dicts, lists and scalars (YAML 1.2 core schema: `yes` and `on`
    are strings); never constructs objects from tags."""
    if not isinstance(text, str):
        text = text.read()
    try:
        return YAML(typ="safe").load(text)
    except YAMLError:
        # libyaml is YAML 1.1 and refuses some 1.2 text (`[http://a:8080]`: a colon in a
        # flow scalar); ruamel's own parser is 1.2, and slower, so it only takes these.
        return YAML(typ="safe", pure=True).load(text)


def dump(data: Any) -> str:
    """Block-style YAML text, keys in the order given."""
    out = io.StringIO()
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    yaml.dump(data, out)
    return out.getvalue()
