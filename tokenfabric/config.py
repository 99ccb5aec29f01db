"""Configuration: a YAML file, overridden by the environment, overridden by flags.

A file holds one mapping per section (``controller:``, ``agent:``, ``lab:``...).
An environment variable ``TOKENFABRIC_<SECTION>__<KEY>`` overrides one key of
one section; its value is read as YAML, so ``8``, ``true`` and ``[a, b]`` keep
their types. Flags given on the command line win over both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenfabric import yamlio

ENV_PREFIX = "TOKENFABRIC_"
CONFIG_ENV = "TOKENFABRIC_CONFIG"


class ConfigError(ValueError):
    """A configuration file that cannot be read or is not a mapping of sections."""


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = yamlio.load(text) or {}
    except yamlio.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_section(
    section: str,
    defaults: Mapping[str, Any],
    path: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Merge defaults < file section < environment < flags (flags that are None are unset).

    Unknown keys in the file or the environment are an error, so that a typo
    never silently falls back to a default.
    """
    environ = os.environ if environ is None else environ
    merged = dict(defaults)
    path = path or environ.get(CONFIG_ENV)
    if path:
        path = Path(path)
        body = _read_file(path).get(section) or {}
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping")
        unknown = sorted(set(body) - set(defaults))
        if unknown:
            raise ConfigError(f"{path}: {section}: unknown key(s): {', '.join(unknown)}")
        merged.update(body)
    prefix = f"{ENV_PREFIX}{section.upper()}__"
    for name, raw in environ.items():
        if not name.startswith(prefix):
            continue
        key = name[len(prefix):].lower()
        if key not in defaults:
            raise ConfigError(f"{name}: '{key}' is not a key of section '{section}'")
        merged[key] = yamlio.load(raw) if raw else raw
    for key, value in (flags or {}).items():
        if value is not None:
            merged[key] = value
    return merged
