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
    return YAML(typ="safe").load(text)


def dump(data: Any) -> str:
    """Block-style YAML text, keys in the order given."""
    out = io.StringIO()
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    yaml.dump(data, out)
    return out.getvalue()
