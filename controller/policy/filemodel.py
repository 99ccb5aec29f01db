"""pydantic models of YAML files, with errors as `file:line: field.path: message`.

A file's shape (keys, types, ranges) is a pydantic model (`FileModel`: unknown keys
forbidden, no coercion: `true` is not 1, "8" is not 8). `check(model, node)` validates
the value of one Node (controller/policy/source.py: a value with its path and line) and
turns each pydantic error into the house message at the line of the key or item it
names, found by walking the line-numbered YAML (controller/policy/lineyaml.py) along the
error's location. A value that does not validate is None, so a caller validates a file
piece by piece (each contract, each tenant) and reports every problem in one pass.

Range and choice checks raise `Problem` with the message an operator reads
(`must be in 0..63, got 64`); pydantic's own type errors are translated in `_message`.
FileModel is strict, so `Annotated[int, in_range(0, 63)]` refuses `true` and "8".
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from tokenfabric.controller.policy.source import Node, type_name

M = TypeVar("M", bound=BaseModel)


class FileModel(BaseModel):
    """One mapping of a file: unknown keys are errors, values keep their YAML type."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              populate_by_name=True)


def Problem(message: str) -> PydanticCustomError:  # noqa: N802 - reads as an exception
    """An error whose message is shown as written."""
    return PydanticCustomError("file_problem", message)


def _range(lo: int | None, hi: int | None, gt: int | None) -> Callable[[int], int]:
    def check(v: int) -> int:
        if gt is not None and v <= gt:
            raise Problem(f"must be > {gt}, got {v}")
        if lo is not None and hi is not None and not lo <= v <= hi:
            raise Problem(f"must be in {lo}..{hi}, got {v}")
        if lo is not None and v < lo:
            raise Problem(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise Problem(f"must be <= {hi}, got {v}")
        return v
    return check


def in_range(lo: int | None = None, hi: int | None = None,
             gt: int | None = None) -> AfterValidator:
    """`Annotated[int, in_range(0, 63)]`: an integer (never a boolean) within bounds."""
    return AfterValidator(_range(lo, hi, gt))


def text_check(check: Callable[[str], str | None] | None = None,
               choices: Sequence[str] | None = None) -> AfterValidator:
    """`Annotated[str, text_check(...)]`: one of `choices`, or passing `check` (which
    returns a problem or None)."""
    def validate(v: str) -> str:
        if choices is not None and v not in choices:
            raise Problem(f"must be one of {', '.join(choices)}; got '{v}'")
        problem = check(v) if check is not None else None
        if problem:
            raise Problem(problem)
        return v
    return AfterValidator(validate)


_TYPE_WORDS = {
    "int_type": "must be an integer", "string_type": "must be a string",
    "bool_type": "must be true or false", "list_type": "must be a list",
    "dict_type": "must be a mapping", "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping", "float_type": "must be a number",
}


def _message(error: Any, model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "file_problem":
        return str(error["msg"])
    if kind in _TYPE_WORDS:
        return f"{_TYPE_WORDS[kind]}, got {type_name(error['input'])}"
    if kind in ("extra_forbidden", "invalid_key"):  # invalid: a key that is no string
        known = _known_keys(model, error["loc"][:-1])
        return f"unknown key (known keys: {', '.join(known)})"
    return str(error["msg"]).removeprefix("Value error, ")


def _inner(annotation: Any, part: str | int) -> Any:
    """The type of `part` (a key or an index) inside a value of type `annotation`."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _inner(get_args(annotation)[0], part)
    if origin in (Union, types.UnionType):
        for option in get_args(annotation):
            if option is not type(None):
                return _inner(option, part)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
        return None
    if origin in (list, tuple, Sequence, typing.Sequence):
        return get_args(annotation)[0] if get_args(annotation) else None
    if origin is dict:
        return get_args(annotation)[1]
    return None


def _known_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    annotation: Any = model
    for part in loc:
        annotation = _inner(annotation, part)
    while get_origin(annotation) in (Annotated, Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sorted(field.alias or name for name, field in annotation.model_fields.items())
    return []


def _node_at(node: Node, loc: Sequence[str | int]) -> Node:
    """The deepest node along loc that the file has (a missing key: its mapping)."""
    for part in loc:
        if isinstance(part, int) and isinstance(node.value, list):
            if not 0 <= part < len(node.value):
                break
            node = node.element(part)
        elif isinstance(part, str) and isinstance(node.value, dict):
            child = node.child(part)
            if child is None:
                break
            node = child
        else:
            break
    return node


def report(exc: ValidationError, node: Node, model: type[BaseModel]) -> None:
    """Each error of exc as an error of the file, at the key or item it is about."""
    for error in exc.errors():
        loc = error["loc"]
        if error["type"] == "missing":
            _node_at(node, loc[:-1]).error(f"missing required key '{loc[-1]}'")
        elif error["type"] == "invalid_key":  # loc names the key by its str()
            parent = _node_at(node, loc[:-1])
            key = error["input"]
            where = parent.child(key) if isinstance(parent.value, dict) else None
            (where or parent).error(_message(error, model))
        else:
            _node_at(node, loc).error(_message(error, model))


_UNKNOWN_KEY = ("extra_forbidden", "invalid_key")


def _without(value: Any, key_paths: list[tuple[Any, ...]]) -> Any:
    """value without the keys at key_paths (copied where changed, never mutated)."""
    if not key_paths:
        return value
    if isinstance(value, dict):
        here = {p[0] for p in key_paths if len(p) == 1}
        return {k: _without(v, [p[1:] for p in key_paths if len(p) > 1 and p[0] == k])
                for k, v in value.items() if k not in here}
    if isinstance(value, list):
        return [_without(v, [p[1:] for p in key_paths if len(p) > 1 and p[0] == i])
                for i, v in enumerate(value)]
    return value


@functools.cache
def _keys(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(field.alias or name for name, field in model.model_fields.items())


def check(model: type[M], node: Node) -> M | None:
    """node's value as model, or None after reporting every problem in it. Unknown keys
    are reported and then left out: the rest of the value still counts (as a value with
    a typo'd extra key did before; its other checks and references still run)."""
    value = node.value
    if isinstance(value, dict):  # this level's unknown keys: found without a second pass
        known = _keys(model)
        unknown = [k for k in value if k not in known]
        if unknown:
            message = f"unknown key (known keys: {', '.join(sorted(known))})"
            for key in unknown:
                (node.child(key) or node).error(message)
            value = {k: v for k, v in value.items() if k in known}
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        report(exc, node, model)
        errors = exc.errors()
        if any(e["type"] not in _UNKNOWN_KEY for e in errors):
            return None
        unknown = [(*e["loc"][:-1], e["input"] if e["type"] == "invalid_key" else e["loc"][-1])
                   for e in errors]
        try:
            return model.model_validate(_without(value, unknown))
        except ValidationError:  # pragma: no cover - only unknown keys were wrong
            return None
