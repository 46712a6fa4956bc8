"""The dependency rule of the package (README, "Developing"): a module imports only modules of its own
layer or of a lower one, never upwards, so nothing low down can reach the daemon. Read from the
source with `ast` (every import, lazy ones included); a new module must be given its layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "proto4d"

LAYERS: list[tuple[str, set[str]]] = [
    ("pure core", {"accesslog", "policy", "retention", "states", "drain", "shim.proto4d_drain", "textsafe",
                   "appenv"}),
    ("config", {"config"}),
    ("infrastructure", {"fsutil", "paths", "procs", "log", "listener", "health", "notices", "child", "activity",
                        "faults", "inbox", "notifier", "host", "snapshots", "migrate", "envwatch", "exporttree", "lean",
                        "accesschannel", "appuser", "outbound"}),
    ("releases and the app process", {"releases", "runner", "prune", "canarydata", "datasteps", "staging",
                                      "spare", "ahead"}),
    ("the update", {"update"}),
    ("the daemon", {"supervisor", "service", "configwait"}),
    # demo/ (proto4d demo, the load generator) and web/ (the status page, a process of its own) are
    # subpackages: every module in them is of this layer
    ("the CLI", {"cli", "views", "__main__", "__init__", "demo", "web", "doctor", "backups", "pending",
                 "logview", "client"}),
]
# Known exceptions, each with its reason; the list only shrinks.
ALLOWED_UPWARDS: dict[tuple[str, str], str] = {}


def layer_of(module: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if module in members or module.split(".")[0] in members:
            return i
    raise AssertionError(f"proto4d.{module} has no layer: add it to LAYERS in tests/test_layers.py "
                         "(and to the map in README.md, Developing)")


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(PACKAGE).with_suffix("")
        if "sample" in rel.parts:
            continue  # the bundled sample app is not part of proto4d
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__") if name != "__init__" else name] = p
    return out


def imports(path: Path) -> set[str]:
    """proto4d modules imported anywhere in the file."""
    out: set[str] = set()
    known = set(modules())
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "proto4d":
                out.update(a.name for a in node.names if a.name in known)
            elif node.module.startswith("proto4d."):
                out.add(node.module.removeprefix("proto4d."))
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("proto4d.") for a in node.names if a.name.startswith("proto4d."))
    return out


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_module_imports_upwards():
    wrong = []
    for name, path in sorted(modules().items()):
        for dep in sorted(imports(path)):
            if layer_of(dep) > layer_of(name) and (name, dep) not in ALLOWED_UPWARDS:
                wrong.append(f"proto4d.{name} ({LAYERS[layer_of(name)][0]}) imports proto4d.{dep} "
                             f"({LAYERS[layer_of(dep)][0]})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from proto4d.supervisor import Daemon\n    from proto4d import update, nothing\n")
    assert imports(bad) == {"supervisor", "update"}


def test_the_allowed_exceptions_are_still_needed():
    for (name, dep), why in ALLOWED_UPWARDS.items():
        assert dep in imports(modules()[name]), f"{name} no longer imports {dep}: remove the exception ({why})"
