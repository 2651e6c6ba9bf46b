"""Where each key of a TOML file is written: tomllib parses without positions, so the mapping's
errors find their line here."""

from __future__ import annotations

import re

_BARE_KEY = r"[A-Za-z0-9_-]+"
_BASIC_STR = r'"(?:[^"\\]|\\.)*"'
_LITERAL_STR = r"'[^']*'"
_KEY_PART = f"(?:{_BARE_KEY}|{_BASIC_STR}|{_LITERAL_STR})"
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_LINE = re.compile(rf"^\s*\[\[?\s*(?P<key>{_DOTTED})\s*\]\]?")
_KEY_LINE = re.compile(rf"^\s*(?P<key>{_DOTTED})\s*=")
_KEY_TOKEN = re.compile(_KEY_PART)


def _split_key(dotted: str) -> tuple[str, ...]:
    parts: list[str] = []
    for token in _KEY_TOKEN.findall(dotted):
        if token.startswith('"'):
            parts.append(token[1:-1].replace('\\"', '"').replace("\\\\", "\\"))
        elif token.startswith("'"):
            parts.append(token[1:-1])
        else:
            parts.append(token)
    return tuple(parts)


class LineIndex:
    """Where each key of a TOML file is written (tomllib gives no positions).

    Scans the text for ``[section]`` headers and ``key =`` lines and records the full key path
    of each. Good enough for the files people write: inline tables on one line, no keys inside
    multi-line strings.
    """

    def __init__(self, text: str) -> None:
        self.entries: list[tuple[tuple[str, ...], int]] = []
        section: tuple[str, ...] = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            stripped = line.lstrip()
            if stripped.startswith("#"):
                continue
            header = _HEADER_LINE.match(line)
            if header is not None:
                section = _split_key(header.group("key"))
                self.entries.append((section, number))
                continue
            key = _KEY_LINE.match(line)
            if key is not None:
                self.entries.append(((*section, *_split_key(key.group("key"))), number))
            for quote in ('"""', "'''"):
                if line.count(quote) % 2 == 1:
                    in_multiline = quote
                    break

    def line_of(self, path: tuple[str, ...]) -> int | None:
        """The line that best matches ``path``: the key itself, else its closest written parent."""
        best: tuple[int, bool, int] | None = None
        for entry, number in self.entries:
            common = 0
            for a, b in zip(entry, path, strict=False):
                if a != b:
                    break
                common += 1
            if common == 0:
                continue
            score = (common, common == len(entry), -number)
            if best is None or score > best:
                best = score
        return -best[2] if best is not None else None
