"""README's table of configuration keys is checked against the schema: every key it names exists,
and every default it states in backticks is the default the parser gives."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from proto4d import config

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| (`[a-z_.0-9]+`(?:, `[a-z_.0-9]+`)*) \| (.+?) \| .* \|$")


def table() -> list[tuple[str, str]]:
    """(key, default as written) for every key of the README's additions table."""
    out = []
    for line in README.read_text().splitlines():
        m = ROW.match(line)
        if not m:
            continue
        keys = [k.strip("`") for k in m.group(1).split(", ")]
        defaults = m.group(2).replace("\\|", "|").split(", ") if len(keys) > 1 else [m.group(2).replace("\\|", "|")]
        out += zip(keys, defaults + [""] * (len(keys) - len(defaults)), strict=True)
    return out


def written(text: str) -> object:
    """A default as README writes it, read as YAML when it is a plain value (else the text itself)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


def test_the_readme_table_names_real_keys_with_their_real_defaults(tmp_path: Path) -> None:
    rows = table()
    assert len(rows) >= 15, rows  # the table was found
    schema = config.schema()
    base = f"root: state\npython: {sys.executable}\napp: {{repo: origin}}\n"
    cfg = config.parse(base, "x.yaml", base_dir=tmp_path)
    for key, default in rows:
        section, name = key.split(".")
        if key not in schema:  # a key whose YAML shape is not one field (web.listen: {host, port})
            config.parse(base + f"{section}:\n  {name}: {default.strip('`')}\n", "x.yaml", base_dir=tmp_path)
            continue
        if default.startswith("`") and default.endswith("`"):
            assert getattr(getattr(cfg, section), name) == written(default.strip("`")), (key, default)
