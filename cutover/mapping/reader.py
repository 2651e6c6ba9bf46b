"""The checks every part of the mapping file's loader shares: a typed value or a located error.

:class:`Reader` knows the file's text (to find the line of a key, only when an error needs it) and
turns a wrong shape into :class:`~cutover.errors.MappingError` naming the key, what was found and
the fix. :class:`cutover.mapping.loader.Loader` builds the model on top of it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import NoReturn

from cutover.errors import MappingError
from cutover.mapping.model import dotted
from cutover.mapping.reverse import PredicateValue
from cutover.mapping.toml_lines import LineIndex


class Reader:
    """Typed access to the parsed TOML document, failing with the key's line and a fix."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self._lines: LineIndex | None = None

    def fail(
        self, key: tuple[str, ...], problem: str, *, line_of: tuple[str, ...] | None = None
    ) -> NoReturn:
        """Raise MappingError for ``key``, at the line of ``line_of`` (default: of ``key``)."""
        where = f"{dotted(key)}: " if key else ""
        line = self.line_of(key if line_of is None else line_of)
        raise MappingError(self.path, f"{where}{problem}", line)

    def line_of(self, key: tuple[str, ...]) -> int | None:
        """The line of ``key`` in the file (the index is built on first use: errors are rare)."""
        if self._lines is None:
            self._lines = LineIndex(self.text)
        return self._lines.line_of(key)

    def check_keys(
        self, key: tuple[str, ...], table: Mapping[str, object], known: tuple[str, ...], what: str
    ) -> None:
        for name in table:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                self.fail(
                    key,
                    f'unknown {what} key "{name}"{hint} (known: {", ".join(known)})',
                    line_of=(*key, name),
                )

    def table(self, key: tuple[str, ...], value: object, hint: str) -> dict[str, object]:
        if not isinstance(value, dict):
            self.fail(key, f"must be a table ({hint}), not {describe(value)}")
        return value

    def string(self, key: tuple[str, ...], value: object, hint: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string ({hint}), not {describe(value)}")
        return value

    def required(
        self, key: tuple[str, ...], table: Mapping[str, object], name: str, hint: str
    ) -> object:
        if name not in table:
            self.fail((*key, name), f'missing required key "{name}"; add {hint}')
        return table[name]

    def names(self, key: tuple[str, ...], value: object, hint: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(key, f"must be an array of column names ({hint}), not {describe(value)}")
        out: list[str] = []
        for item in value:
            if not isinstance(item, str) or not item:
                self.fail(key, f"must hold non-empty column names, not {describe(item)}")
            if item in out:
                self.fail(key, f'lists "{item}" twice; list each column once')
            out.append(item)
        return tuple(out)

    def predicate_values(
        self, key: tuple[str, ...], op: str, value: object
    ) -> tuple[PredicateValue, ...]:
        if op == "equals":
            items: list[object] = [value]
        elif isinstance(value, list) and value:
            items = value
        else:
            self.fail((*key, op), f"`in` needs a non-empty array of values, not {describe(value)}")
        out: list[PredicateValue] = []
        for item in items:
            if not isinstance(item, str | int):  # bool is an int
                self.fail(
                    (*key, op),
                    f"compares with strings, integers or booleans, not {describe(item)}; "
                    "floats cannot be compared exactly",
                )
            out.append(item)
        return tuple(out)


def describe(value: object) -> str:
    """What a wrong value is, for an error message: its kind, and the value if it is short."""
    kinds = {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}
    kind = kinds.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if not isinstance(value, dict | list) else kind
