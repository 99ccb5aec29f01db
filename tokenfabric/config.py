"""Configuration: a YAML file, overridden by the environment, overridden by flags.

A file holds one mapping per section (``controller:``, ``agent:``, ``lab:``...).
An environment variable ``TOKENFABRIC_<SECTION>__<KEY>`` overrides one key of
one section; its value is read as YAML, so ``8``, ``true`` and ``[a, b]`` keep
their types. Flags given on the command line win over both.

A section is a pydantic-settings model (`SectionSettings`): its fields are the keys and
their defaults, and pydantic-settings merges the sources in that order (flags are the
init arguments, then `_SectionEnv`, then `_SectionFile`). Unknown keys in the file or
the environment are an error, so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tokenfabric import yamlio

ENV_PREFIX = "TOKENFABRIC_"
CONFIG_ENV = "TOKENFABRIC_CONFIG"


class ConfigError(ValueError):
    """A configuration that cannot be read, or a value that is not valid."""


@dataclass(frozen=True)
class _Inputs:
    path: Path | None
    environ: Mapping[str, str]


# What the settings sources of the load in progress read (set by load_settings only).
_INPUTS: ContextVar[_Inputs] = ContextVar("tokenfabric_config_inputs")


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


class _SectionSource(PydanticBaseSettingsSource):
    """Base of the two sources below: a whole section at once, not field by field."""

    def __init__(self, settings_cls: type[BaseSettings], section: str,
                 inputs: _Inputs) -> None:
        super().__init__(settings_cls)
        self.section = section
        self.inputs = inputs
        self.known = set(settings_cls.model_fields)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the section in one go


class _SectionFile(_SectionSource):
    def __call__(self) -> dict[str, Any]:
        path = self.inputs.path
        if path is None:
            return {}
        body = _read_file(path).get(self.section) or {}
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{self.section}' must be a mapping")
        unknown = sorted(set(body) - self.known)
        if unknown:
            raise ConfigError(f"{path}: {self.section}: unknown key(s): {', '.join(unknown)}")
        return dict(body)


class _SectionEnv(_SectionSource):
    def __call__(self) -> dict[str, Any]:
        prefix = f"{ENV_PREFIX}{self.section.upper()}__"
        values: dict[str, Any] = {}
        for name, raw in self.inputs.environ.items():
            if not name.startswith(prefix):
                continue
            key = name[len(prefix):].lower()
            if key not in self.known:
                raise ConfigError(f"{name}: '{key}' is not a key of section '{self.section}'")
            try:
                values[key] = yamlio.load(raw) if raw else raw
            except yamlio.YAMLError as exc:
                raise ConfigError(f"{name}: not valid YAML: {exc}") from exc
        return values


class SectionSettings(BaseSettings):
    """One section of the configuration; subclasses name it in SECTION."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)
    SECTION: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        inputs = _INPUTS.get(_Inputs(None, {}))
        return (init_settings, _SectionEnv(settings_cls, cls.SECTION, inputs),
                _SectionFile(settings_cls, cls.SECTION, inputs))


Section = TypeVar("Section", bound=SectionSettings)


def validation_message(section: str, exc: ValidationError) -> str:
    """`section.key: message` for each problem (the model's own checks say it themselves)."""
    lines = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"{section}.{loc}: unknown key")
        elif error["type"] == "missing":
            lines.append(f"{section}.{loc} is required")
        elif loc:
            lines.append(f"{section}.{loc}: {message}")
        else:
            lines.append(message)
    return "; ".join(lines)


def load_settings(model: type[Section], path: str | Path | None = None,
                  flags: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Section:
    """The section `model` from defaults < file < environment < flags (None flags unset);
    ConfigError naming the file, variable or key on any problem."""
    environ = os.environ if environ is None else environ
    where = path or environ.get(CONFIG_ENV)
    token = _INPUTS.set(_Inputs(Path(where) if where else None, environ))
    try:
        return model(**{k: v for k, v in (flags or {}).items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(validation_message(model.SECTION, exc)) from None
    finally:
        _INPUTS.reset(token)


def load_section(
    section: str,
    defaults: Mapping[str, Any],
    path: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A section whose keys are only named (any value; the caller checks them): the same
    sources and precedence as load_settings, as a dict."""
    fields: dict[str, Any] = {key: (Any, value) for key, value in defaults.items()}
    model = create_model(f"{section}_settings", __base__=SectionSettings, **fields)
    model.SECTION = section
    return load_settings(model, path, flags, environ).model_dump()
