"""YAML with line numbers, parsed by libyaml (ruamel.yaml.clib) under the YAML 1.2 core schema.

`load(text)` returns plain dicts and lists that also carry the 1-based line of
each key (`LineMap.lines`) and of each list item (`LineSeq.lines`), for
`file:line: field.path: message` errors. It replaces ruamel's round-trip loader,
which is pure Python and took ~10 s for a 20,000-tenant policy: here libyaml (through
ruamel.yaml's C extension, the project's one YAML library) parses and composes the node
tree in C, and one small pass turns the nodes into values (a generic constructor costs
as much again as the parse).

What the loader keeps from the round-trip loader the policy and fabric files were
written against: YAML 1.2 scalars (`yes`, `on`, `0777` stay what 1.2 says they are),
a duplicate key is an error, an unknown tag is read as its plain node (so
`!!python/...` is only a list or mapping, never code), a list used as a key is a
tuple. Merge keys (`<<`) work; keys that come from a merge take the line of the
mapping they are merged into.

Limits: aliases are shared, not copied, but whoever walks the document walks each
use; a document that is larger than MAX_VALUES values counted that way (merged
keys included), or that contains itself, is refused (TooLarge).
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

from _ruamel_yaml import CParser  # ruamel.yaml.clib: libyaml
from ruamel.yaml import YAML
from ruamel.yaml.constructor import ConstructorError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.loader import BaseLoader
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.tag import Tag

from tokenfabric.controller.gctools import gc_paused

__all__ = ["MAX_VALUES", "LineMap", "LineSeq", "MarkedYAMLError", "TooLarge", "YAMLError",
           "load"]
MAX_VALUES = 1_000_000  # keys, values and items, aliases counted as often as they are used

_PLAIN = "!plain"  # a plain scalar, resolved below (cheaper than in the parser's callback)
_STR = "tag:yaml.org,2002:str"
_MERGE_KEY = "<<"
# YAML 1.2.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
_NULLS = {"", "~", "null", "Null", "NULL"}
_BOOLS = {"true": True, "True": True, "TRUE": True,
          "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_SPECIAL_FLOATS = {".inf": float("inf"), ".Inf": float("inf"), ".INF": float("inf"),
                   "+.inf": float("inf"), "+.Inf": float("inf"), "+.INF": float("inf"),
                   "-.inf": float("-inf"), "-.Inf": float("-inf"), "-.INF": float("-inf"),
                   ".nan": float("nan"), ".NaN": float("nan"), ".NAN": float("nan")}
_MAYBE_NOT_STR = set("~nNtTfF-+.0123456789")  # first characters of anything but a string


class TooLarge(YAMLError):
    """Aliases or merges that make a small text into more than MAX_VALUES values."""


class LineMap(dict):
    """A mapping with the line of each of its own keys (merged keys have none)."""

    __slots__ = ("line", "lines")

    def __init__(self, line: int = 0) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[Any, int] = {}


class LineSeq(list):
    """A list with the line of each item."""

    __slots__ = ("line", "lines")

    def __init__(self, line: int = 0) -> None:
        super().__init__()
        self.line = line
        self.lines: list[int] = []


class _Composer(CParser):  # type: ignore[misc]
    """libyaml's parser and composer; plain scalars are only marked, not resolved."""

    # ruamel's composer asks its resolver to follow the path; path-based tags are unused.
    def descend_resolver(self, *_: Any) -> None:
        pass

    def ascend_resolver(self, *_: Any) -> None:
        pass

    def resolve(self, kind: type, value: Any, implicit: Any, *_: Any) -> str:
        # Called from C for every node: the less it does, the faster the parse.
        if kind is ScalarNode:
            return _PLAIN if implicit[0] else _STR
        return "tag:yaml.org,2002:seq" if kind is SequenceNode else "tag:yaml.org,2002:map"


_TAGS = {kind: Tag(suffix=tag) for kind, tag in (
    ("plain", _PLAIN), ("str", _STR), ("seq", "tag:yaml.org,2002:seq"),
    ("map", "tag:yaml.org,2002:map"))}


class _PureComposer(BaseLoader):
    """ruamel's pure-Python parser and composer, with the same marking as _Composer.

    Only for text libyaml refuses: the libyaml inside ruamel.yaml.clib predates YAML 1.2's
    rule that a `:` not followed by a space is part of a plain scalar in flow context
    (`[leaf1:4, spine1:1]`), which the fabric files use."""

    max_depth = None  # the text was checked for depth before parsing (policy/source.py)

    def resolve(self, kind: type, value: Any, implicit: Any) -> Tag:
        if kind is ScalarNode:
            return _TAGS["plain"] if implicit[0] else _TAGS["str"]
        return _TAGS["seq"] if kind is SequenceNode else _TAGS["map"]


def _compose(text: str) -> Node | None:
    """libyaml's node tree; ruamel's pure-Python one where libyaml refuses the text (and
    then libyaml's error when both refuse it, so that errors read the same either way)."""
    composer = _Composer(text)
    try:
        return composer.get_single_node()
    except MarkedYAMLError as first:
        try:
            return _PureComposer(text).get_single_node()
        except MarkedYAMLError:
            raise first from None
    finally:
        composer.dispose()


def _tag(node: Node) -> str:
    """A node's tag as text. ruamel wraps every tag in a Tag object whose `tag` property
    URI-decodes it on each read; the tags _Composer gives (the only ones on most nodes)
    are plain suffixes, read as they are."""
    ctag = node.ctag
    if ctag is None:
        return ""
    if ctag.handle is None and "%" not in ctag.suffix:
        return str(ctag.suffix)
    return node.tag or ""


def _plain(value: str) -> Any:
    """A plain scalar's value under the 1.2 core schema."""
    if not value or value[0] in _MAYBE_NOT_STR:
        if value in _NULLS:
            return None
        if value in _BOOLS:
            return _BOOLS[value]
        if _INT.fullmatch(value):
            if value.startswith(("0o", "0x")):
                return int(value[2:], 8 if value[1] == "o" else 16)
            return int(value)
        if value in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value]
        if _FLOAT.fullmatch(value):
            return float(value)
    return value


class _Builder:
    """Nodes to values; each node once (an alias is the same object again)."""

    def __init__(self) -> None:
        self.built: dict[int, Any] = {}
        self.budget = MAX_VALUES
        # for explicitly tagged scalars (!!binary, !!int)
        self.tagged = YAML(typ="safe", pure=True).constructor

    def _spend(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise TooLarge(f"more than {MAX_VALUES} values (keys from '<<' included)")

    def value(self, node: Node) -> Any:
        if isinstance(node, ScalarNode):
            tag = _tag(node)
            if tag == _PLAIN:
                return _plain(node.value)
            if tag == _STR or not tag.startswith("tag:yaml.org,2002:"):
                return node.value  # quoted, !!str, or an unknown tag: the text
            return self._tagged_scalar(node)
        known = self.built.get(id(node))
        if known is not None:
            return known
        if isinstance(node, SequenceNode):
            return self._seq(node)
        assert isinstance(node, MappingNode)
        return self._map(node)

    def _tagged_scalar(self, node: ScalarNode) -> Any:
        try:
            return self.tagged.construct_object(node, deep=True)
        except ConstructorError:
            raise
        except (ValueError, TypeError) as exc:  # e.g. !!int "x"
            raise ConstructorError(
                None, None, f"{node.tag} {node.value!r}: {exc}", node.start_mark) from None

    def _seq(self, node: SequenceNode) -> LineSeq:
        data = LineSeq(node.start_mark.line + 1)
        self.built[id(node)] = data  # before the items: an item may be an alias of this list
        self._spend(len(node.value))
        for item in node.value:
            data.append(self.value(item))
            data.lines.append(item.start_mark.line + 1)
        return data

    def _map(self, node: MappingNode) -> LineMap:
        data = LineMap(node.start_mark.line + 1)
        self.built[id(node)] = data
        merged = self._merged_pairs(node, set())
        self._spend(len(merged) + len(node.value))
        for key_node, value_node in merged:
            data[self._key(key_node, node)] = self.value(value_node)
        for key_node, value_node in node.value:
            if _is_merge(key_node):
                continue
            key = self._key(key_node, node)
            if key in data.lines:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            data[key] = self.value(value_node)
            data.lines[key] = key_node.start_mark.line + 1
        return data

    def _key(self, key_node: Node, parent: MappingNode) -> Hashable:
        if isinstance(key_node, SequenceNode):  # `? [a, b]`: a tuple, as ruamel made it
            return tuple(self._key(k, parent) for k in key_node.value)
        key = self.value(key_node)
        if not isinstance(key, Hashable):
            raise ConstructorError(
                "while constructing a mapping", parent.start_mark,
                "found an unhashable key", key_node.start_mark)
        return key

    def _merged_pairs(self, node: MappingNode, seen: set[int]) -> list[tuple[Node, Node]]:
        """The pairs `<<` brings into node, each scalar key once (the last one wins, which
        makes the earlier of several merged mappings win, as YAML's merge says); `seen`
        stops a mapping from merging itself."""
        sources: list[MappingNode] = []
        for key_node, value_node in node.value:
            if not _is_merge(key_node):
                continue
            if isinstance(value_node, MappingNode):
                sources.append(value_node)
            elif isinstance(value_node, SequenceNode) and all(
                    isinstance(v, MappingNode) for v in value_node.value):
                sources.extend(reversed(value_node.value))
            else:
                raise ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "'<<' takes a mapping or a list of mappings", value_node.start_mark)
        pairs: dict[Any, tuple[Node, Node]] = {}
        for source in sources:
            if id(source) in seen:
                continue
            seen.add(id(source))
            for key_node, value_node in [*self._merged_pairs(source, seen), *source.value]:
                if _is_merge(key_node):
                    continue
                identity = (_tag(key_node), key_node.value) if isinstance(key_node, ScalarNode) \
                    else id(key_node)
                pairs.pop(identity, None)
                pairs[identity] = (key_node, value_node)
        self._spend(len(pairs))
        return list(pairs.values())


def _is_merge(key_node: Node) -> bool:
    return key_node.value == _MERGE_KEY and _tag(key_node) == _PLAIN


def load(text: str) -> Any:
    """One YAML document; raises YAMLError (MarkedYAMLError with a line for most)."""
    with gc_paused():
        node = _compose(text)
        if node is None:
            return None
        data = _Builder().value(node)
        _check_expanded_size(data)
    return data


def _check_expanded_size(data: Any) -> None:
    """Count values as a walker meets them (each container's size once, memoized) and
    refuse a document larger that way than MAX_VALUES, or one that contains itself."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()  # the containers on the current path
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:  # iterative: a deep document must not exhaust the interpreter's stack
        value, children_done = stack.pop()
        key = id(value)
        if children_done:
            in_progress.discard(key)
            items = value.values() if isinstance(value, dict) else value
            total = 1 + len(value) + sum(sizes.get(id(v), 0) for v in items
                                         if isinstance(v, dict | list))
            if total > MAX_VALUES:
                raise TooLarge(f"more than {MAX_VALUES} values once aliases are expanded")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in in_progress:
            raise TooLarge("an alias refers to a node that contains it")
        in_progress.add(key)
        stack.append((value, True))
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, False) for child in children
                     if isinstance(child, dict | list) and id(child) not in sizes)

