"""textsafe.safe_text: no control sequence survives, the printable text does."""

from __future__ import annotations

import pytest

from proto4d.textsafe import safe_text

CASES = [
    # (what the app printed, what the operator sees)
    ("plain text, 한국어, émoji 🎉", "plain text, 한국어, émoji 🎉"),
    ("\x1b[31mred\x1b[0m", "red"),
    ("\x1b[2J\x1b[Hcleared", "cleared"),
    ("\x1b[?1049h alt screen", " alt screen"),
    ("title \x1b]0;pwned\x07 after", "title  after"),
    ("clip \x1b]52;c;cm0gLXJmIH4=\x1b\\ after", "clip  after"),
    ("link \x1b]8;;http://evil\x1b\\text\x1b]8;;\x1b\\", "link text"),
    ("unterminated \x1b]0;title to the end", "unterminated "),
    ("dcs \x1bPq#0;2;0;0;0\x1b\\ after", "dcs  after"),
    ("apc \x1b_payload\x9c after", "apc  after"),
    ("c1 csi \x9b31mred", "c1 csi red"),
    ("c1 osc \x9d0;title\x07 after", "c1 osc  after"),
    ("charset \x1b(0 after", "charset  after"),
    ("reset \x1bc after", "reset  after"),
    ("bell\x07", "bell\\x07"),
    ("over\rwrite", "over\\x0dwrite"),
    ("back\x08space", "back\\x08space"),
    ("del\x7f", "del\\x7f"),
    ("nul\x00", "nul\\x00"),
    ("lone esc \x1b", "lone esc \\x1b"),
    ("bidi \u202egnp.exe", "bidi \\u202egnp.exe"),
    ("isolate \u2066x\u2069", "isolate \\u2066x\\u2069"),
    ("line\nbreak", "line\\x0abreak"),
    ("tab\there", "tab here"),
    ("c1 lone \x85 nel", "c1 lone \\x85 nel"),
]


@pytest.mark.parametrize(("raw", "shown"), CASES)
def test_safe_text(raw: str, shown: str) -> None:
    assert safe_text(raw) == shown


def test_multiline_keeps_newlines_and_tabs_but_not_carriage_returns() -> None:
    assert safe_text("a\n\tb\r\n\x1b[1mc", multiline=True) == "a\n\tb\\x0d\nc"


def test_an_unterminated_string_sequence_hides_no_more_than_its_line() -> None:
    assert safe_text("one \x1b]0;title\ntwo", multiline=True) == "one \ntwo"


def test_non_strings_are_shown_by_str() -> None:
    assert safe_text(None) == "None"
    assert safe_text(42) == "42"


def test_the_result_holds_no_control_character_at_all() -> None:
    every = "".join(chr(i) for i in range(0x00, 0xa0)) + "\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2069"
    for text in (every, "\x1b" + every, every[::-1]):
        out = safe_text(text)
        assert all(c.isprintable() for c in out), repr(out)


def test_status_view_shows_no_escape_from_any_field() -> None:
    from proto4d.views import render_status

    hostile = "\x1b]0;owned\x07\x1b[2J\x9b31m\nupdate   done (fake line)\r"
    status = {"daemon": {"pid": 1, "state": "running", "version": hostile},
              "app": {"state": "running", "message": hostile, "last_exit": hostile, "drain": hostile,
                      "release": hostile},
              "activity": {"verdict": "green", "reasons": [hostile]},
              "update": {"state": "waiting", "id": hostile, "ref": hostile, "reason": hostile,
                         "waiting_for": hostile, "log": hostile,
                         "queued": {"id": hostile}, "last_rejected": {"id": hostile, "reason": hostile}}}
    out = render_status(status, hostile)
    assert "\x1b" not in out and "\x9b" not in out and "\r" not in out and "\x07" not in out
    assert not any(line.startswith("update   done") for line in out.splitlines())
