"""User text made safe to show: one visible line, never a control sequence.

Config values, interface names and file paths come from whoever wrote the
config (or named the file). Shown raw, a newline in one of them would forge a
second error or log line, and an escape sequence would rewrite the terminal.
Every message that echoes such text goes through :func:`quote` (config errors)
or :func:`escape` (log lines, as a last defence), so a message always shows
what was written, escaped, on one line.

Pure: no I/O.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Final

__all__ = ["ECHO_MAX", "escape", "path", "quote"]

ECHO_MAX: Final = 64
"""How many characters of a value a message echoes before it cuts the rest."""

_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# control (Cc), format (Cf: bidirectional overrides, zero-width joiners), surrogate
# (Cs: undecodable bytes of a file name), private use, unassigned, line and
# paragraph separators, and spaces other than ' '
_HIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


def _hidden(char: str) -> bool:
    if " " <= char <= "~":
        return False
    return unicodedata.category(char) in _HIDDEN_CATEGORIES


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        # a byte that was not UTF-8 (surrogateescape): show the byte itself
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with every invisible or controlling character written as an escape.

    Printable text, including non-ASCII letters, is left as it is; backslashes
    too, so text that is already escaped is not escaped again.
    """
    if text.isprintable() and text.isascii():
        return text
    return "".join(_escape_char(c) if _hidden(c) else c for c in text)


def quote(text: str, limit: int = ECHO_MAX) -> str:
    """``text`` in double quotes for a message: escaped, and cut after ``limit`` characters.

    Quotes and backslashes inside are escaped too, so where the value ends is never
    in doubt. A cut value says how long it was: ``"aaaa..." (5000 characters)``.
    """
    shown = text if len(text) <= limit else text[:limit]
    body = "".join(
        "\\" + c if c in '"\\' else _escape_char(c) if _hidden(c) else c for c in shown
    )
    if len(text) > limit:
        return f'"{body}..." ({len(text)} characters)'
    return f'"{body}"'


def path(name: str | os.PathLike[str] | bytes) -> str:
    """A file name for a message: as it is when plain, else quoted and escaped."""
    if isinstance(name, bytes):
        text = os.fsdecode(name)
    else:
        text = os.fspath(name)
    if text and all(" " < c <= "~" and c not in "\"'\\" for c in text):
        return text
    return quote(text, limit=256)
