"""Reading YAML with line numbers, for error messages an operator can act on.

Every error is `file:line: field.path: message`, e.g.
`policy.yaml:14: tenants[2].contract.tpm: must be > 0`. A `Node` wraps one YAML
value with its path and line, and records errors in a shared list instead of raising,
so that one pass reports every error in the file. The files' shapes are pydantic models
checked on nodes (controller/policy/filemodel.py); `as_int`/`as_str` remain for the few
values whose shape is free-form (a fabric's ports and links).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tokenfabric.controller.policy import lineyaml
from tokenfabric.controller.policy.lineyaml import LineMap, LineSeq

MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecError(ValueError):
    """A file that failed validation; `errors` lists the first MAX_SHOWN_ERRORS problems,
    one line each, then a line that counts the rest; `total` counts them all."""

    def __init__(self, errors: list[str], total: int | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.total = len(errors) if total is None else total


class Errors:
    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[tuple[int, str]] = []

    def add(self, line: int, path: str, message: str) -> None:
        where = f"{path}: " if path else ""
        self.items.append((line, f"{self.file}:{line}: {where}{message}"))

    def messages(self, limit: int | None = None) -> list[str]:
        """Sorted by line; beyond `limit` the rest are counted in one last line."""
        ordered = [m for _, m in sorted(self.items, key=lambda x: x[0])]
        if limit is None or len(ordered) <= limit:
            return ordered
        rest = len(ordered) - limit
        return [*ordered[:limit], f"{self.file}: ... and {rest} more error{'s' * (rest > 1)}"]

    def raise_if_any(self) -> None:
        if self.items:
            raise SpecError(self.messages(MAX_SHOWN_ERRORS), total=len(self.items))


MAX_SHOWN_ERRORS = 40  # a file wrong on every line needs its first errors fixed, not all
MAX_BYTES = 8 << 20  # far above any real policy (1,000 tenants is ~100 kB)
MAX_NESTING = 64  # flow brackets or indentation levels; the parser recurses per level
_STRUCTURE = re.compile(r"[^\[\]{}\n]+")
_DEEP_INDENT = re.compile(rf"^ {{{2 * MAX_NESTING + 1}}}", re.MULTILINE)
# YAML's printable set (YAML 1.2 §5.1): anything else is refused before parsing.
_NOT_PRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd"
                            "\U00010000-\U0010ffff]")


def _too_big_or_deep(text: str) -> tuple[int, str] | None:
    """A cheap scan before parsing: huge, absurdly nested or binary input is refused."""
    if len(text) > MAX_BYTES:
        return 1, f"not accepted: larger than {MAX_BYTES} bytes"
    bad = _NOT_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        return line, (f"not valid YAML: unacceptable character #x{ord(bad.group()):04x}: "
                      "special characters are not allowed")
    depth = 0
    line = 1
    for ch in _STRUCTURE.sub("", text):  # only brackets and line feeds are left
        if ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return line, f"not accepted: nested deeper than {MAX_NESTING} levels"
        elif ch in "]}":
            depth = max(0, depth - 1)
        else:
            line += 1
    deep = _DEEP_INDENT.search(text)
    if deep:
        return (text.count("\n", 0, deep.start()) + 1,
                f"not accepted: indented deeper than {2 * MAX_NESTING} spaces")
    return None


def load_yaml(text: str, file: str) -> tuple[Any, Errors]:
    """Parse (controller/policy/lineyaml.py: values carry their lines); syntax errors
    are reported as errors of the file."""
    errors = Errors(file)
    refused = _too_big_or_deep(text)
    if refused:
        errors.add(refused[0], "", refused[1])
        return None, errors
    try:
        data = lineyaml.load(text)
    except lineyaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or exc.context or "not valid YAML"
        errors.add(line, "", f"not valid YAML: {problem}")
        return None, errors
    except Exception as exc:  # a few errors carry no mark (too large after merging...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        errors.add(1, "", f"not valid YAML: {first}")
        return None, errors
    return data, errors


def read_file(path: str | Path) -> tuple[Any, Errors]:
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        errors = Errors(str(path))
        errors.add(0, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}")
        return None, errors
    return load_yaml(text, str(path))


def _key_line(mapping: object, key: object, default: int) -> int:
    """1-based line of a key; keys from a merge (<<) have none of their own."""
    if isinstance(mapping, LineMap):
        return mapping.lines.get(key, default)
    return default


# How errors name a YAML value's type; bool before int (a bool is an int in Python).
_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
    (dict, "a mapping"), (list, "a list"))


def type_name(value: Any) -> str:
    """How an error names a value's YAML type."""
    if value is None:
        return "null"
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)),
                type(value).__name__)


class Node:
    """One YAML value with where it came from."""

    def __init__(self, value: Any, path: str, line: int, errors: Errors) -> None:
        self.value = value
        self.path = path
        self.line = line
        self.errors = errors

    @classmethod
    def root(cls, value: Any, errors: Errors) -> Node:
        return cls(value, "", 1, errors)

    def error(self, message: str) -> None:
        self.errors.add(self.line, self.path, message)

    # -- structure

    def _child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else str(key)

    def child(self, key: str) -> Node | None:
        """The value under key (marked as known), or None when absent.

        Its line is the key's line: that is where an operator looks for a field,
        also when its value is a block mapping or list starting below it.
        """
        if not isinstance(self.value, dict) or key not in self.value:
            return None
        line = _key_line(self.value, key, self.line)
        return Node(self.value[key], self._child_path(key), line, self.errors)

    def items(self) -> Iterator[tuple[str, Node]]:
        """Key, node pairs of a mapping whose keys are names (switches, services...)."""
        if not isinstance(self.value, dict):
            return
        for key in list(self.value):
            node = self.child(str(key)) if isinstance(key, str) else None
            if node is None:
                self.errors.add(_key_line(self.value, key, self.line),
                                self._child_path(str(key)), "keys must be strings")
                continue
            yield key, node

    def element(self, index: int) -> Node:
        """Item `index` of a list (which has it)."""
        line = self.value.lines[index] if isinstance(self.value, LineSeq) else self.line
        return Node(self.value[index], self._child_path(index), line, self.errors)

    def elements(self) -> Iterator[Node]:
        if not isinstance(self.value, list):
            return
        for i, item in enumerate(self.value):
            line = self.line
            if isinstance(self.value, LineSeq):
                line = self.value.lines[i]
            yield Node(item, self._child_path(i), line, self.errors)

    def as_int(self, *, lo: int | None = None, hi: int | None = None,
               gt: int | None = None) -> int | None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int):
            self.error(f"must be an integer, got {type_name(v)}")
            return None
        if gt is not None and v <= gt:
            self.error(f"must be > {gt}, got {v}")
            return None
        if lo is not None and hi is not None and not lo <= v <= hi:
            self.error(f"must be in {lo}..{hi}, got {v}")
            return None
        if lo is not None and v < lo:
            self.error(f"must be >= {lo}, got {v}")
            return None
        if hi is not None and v > hi:
            self.error(f"must be <= {hi}, got {v}")
            return None
        return int(v)

    def as_str(self, *, choices: list[str] | None = None,
               check: Callable[[str], str | None] | None = None) -> str | None:
        v = self.value
        if not isinstance(v, str):
            self.error(f"must be a string, got {type_name(v)}")
            return None
        if choices is not None and v not in choices:
            self.error(f"must be one of {', '.join(choices)}; got '{v}'")
            return None
        if check is not None:
            problem = check(v)
            if problem:
                self.error(problem)
                return None
        return str(v)


# -- checks for text fields (filemodel.text_check): return a problem or None


def check_name(v: str) -> str | None:
    if NAME_RE.match(v):
        return None
    return f"'{v}' is not a valid name (letters, digits, '_', '.', '-'; at most 64)"


def check_ipv4(v: str) -> str | None:
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        return f"'{v}' is not an IPv4 address"
    return None


def check_ipv4_net(v: str) -> str | None:
    try:
        ipaddress.IPv4Network(v, strict=True)
    except ValueError as exc:
        return f"'{v}' is not an IPv4 prefix ({exc})"
    return None


def check_mac(v: str) -> str | None:
    return None if MAC_RE.match(v) else f"'{v}' is not a MAC address (aa:bb:cc:dd:ee:ff)"


def check_hostport(v: str) -> str | None:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"'{v}' is not host:port"
    return None
