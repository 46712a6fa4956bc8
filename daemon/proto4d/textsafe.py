"""Text that came from the app or a file, made safe to show on a terminal or a web page. Pure.

App output, request reasons, exit messages and drain notes are printed by `proto4d status`,
`activity`, `logs` and the web page. A terminal obeys control sequences: CSI (colours, cursor
moves, screen clears), OSC (window titles, clipboard writes, hyperlinks), DCS/APC/PM/SOS
strings, their 8-bit C1 forms, a bare carriage return that lets a line overwrite what came
before, and Unicode bidi overrides that reorder what is read. `safe_text` removes every escape
sequence whole and shows any other control character as a visible escape (`\\x07`, `\\u202e`),
so what the operator reads is what was printed, and nothing printed can act on the terminal.

The web page escapes HTML itself; it calls `safe_text` first so both views show the same text.
"""

from __future__ import annotations

import re

__all__ = ["safe_text"]

# Escape sequences, removed whole. String sequences (OSC, DCS, SOS, PM, APC) end at BEL or ST;
# an unterminated one ends at the line's end, so it can hide no more than the rest of its line.
_SEQUENCES = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"  # CSI (7-bit and C1)
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\n]*?(?:\x07|\x1b\\|\x9c|(?=\n)|$)"  # string sequences
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]"  # every other escape sequence (charset, keypad, reset...)
)
# What is left that a terminal or a reader would act on: C0 and DEL, C1, line and paragraph
# separators, bidi embeddings, overrides and isolates.
_OTHERS = r"\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c"
_CONTROL = re.compile(rf"[\x00-\x1f{_OTHERS}]")
_CONTROL_MULTILINE = re.compile(rf"[\x00-\x08\x0b-\x1f{_OTHERS}]")  # keeps tab and newline


def _visible(m: re.Match[str]) -> str:
    c = m.group()
    if c == "\t":
        return " "
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def safe_text(text: object, *, multiline: bool = False) -> str:
    """`text` (anything; str() of it) with every escape sequence removed and every other control
    character shown as a visible escape.

    A single-line field (the default) keeps no line break: a newline shows as `\\x0a`, so a value
    cannot print a line that looks like the daemon's own. `multiline=True` keeps newlines and tabs
    (a log excerpt); a carriage return still shows as `\\x0d`.
    """
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():  # the common case: no control character, nothing to do
        return s
    if "\x1b" in s or any("\x90" <= c <= "\x9f" for c in s):
        s = _SEQUENCES.sub("", s)
    return (_CONTROL_MULTILINE if multiline else _CONTROL).sub(_visible, s)
