"""Building one Python function from generated source lines: the compiled Avro codecs' base.

The producer's encoder (:mod:`producers.fast_avro`) and the appliers' decoder
(:mod:`cutover.avro_decode`) each generate, once per schema, one flat function that reads or
writes a record field by field. This is what both need to do that: fresh local names, constants
passed by name (never spliced into the source as text, so nothing from a schema becomes code),
indented lines, and the compiled function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SourceBuilder:
    """Collects the lines of one function and the constants its body names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.names: dict[str, Any] = {}
        self._n = 0

    def var(self, stem: str) -> str:
        """A local name used nowhere else in the function."""
        self._n += 1
        return f"{stem}{self._n}"

    def const(self, value: Any) -> str:
        """The name under which the function sees ``value``."""
        name = self.var("C")
        self.consts[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def build(self, signature: str, label: str, helpers: Mapping[str, Any]) -> Any:
        """Compile ``def <signature>:`` over the emitted lines; ``label`` names it in tracebacks."""
        name = signature.split("(", 1)[0]
        source = f"def {signature}:\n" + "\n".join(self.lines) + "\n"
        scope: dict[str, Any] = {**helpers, **self.consts}
        exec(compile(source, f"<{label}>", "exec"), scope)
        return scope[name]
