"""How the app is told to stop: the drain shim when the command runs uvicorn, else SIGTERM alone.

Pure: argv, the `app.drain` mode, the app's environment and the grace in; a `DrainPlan` out.
No process is started here.

The shim (`shim/proto4d_drain.py`, run inside the app's own interpreter) makes uvicorn's
shutdown lose no request on keep-alive connections: see its docstring. It is applied by
running uvicorn through it, `python -m proto4d_drain <uvicorn's arguments>`, which maps
uvicorn's `--http auto|h11|httptools` to the shim's classes. Rewriting `-m uvicorn` is used
rather than injecting `--http proto4d_drain:AutoDrainProtocol` because uvicorn 0.24 (what
Proto4 pins) accepts only the three names for `--http` and exits with a usage error on an
import string; the launcher works the same on old and new uvicorn.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SHIM_DIR: Path = Path(__file__).resolve().parent / "shim"
SHIM_MODULE = "proto4d_drain"
GRACE_ENV = "PROTO4D_DRAIN_GRACE_S"
# Promotion in place (a canary that may take the shared socket): the shim's control socket and the
# shared listening socket it holds, unserved, until told `promote` (see the shim's docstring).
CONTROL_ENV = "PROTO4D_CONTROL_FD"
SHARED_ENV = "PROTO4D_SHARED_FD"
MODES = ("auto", "shim", "sigterm")

# uvicorn's --http names -> the shim class the launcher maps each to.
_HTTP_CLASSES = {
    "auto": "AutoDrainProtocol",
    "h11": "H11DrainProtocol",
    "httptools": "HttpToolsDrainProtocol",
}
_PYTHON_RE = re.compile(r"^(python(\d+(\.\d+)*)?|pypy\d*|\{python\})$")
_RUNNERS = frozenset({"uv", "poetry", "pipenv", "pdm", "hatch", "rye"})


@dataclass(frozen=True)
class DrainPlan:
    argv: tuple[str, ...]  # the command to run (through the shim's launcher when kind == "shim")
    env: dict[str, str]  # extra environment for the app (empty for "sigterm")
    kind: str  # "shim" | "sigterm"
    description: str  # one line for the log


class _NotApplicable(Exception):
    """Why the shim cannot be used for this command (worded for the log)."""


def plan(argv: Sequence[str], mode: str, base_env: Mapping[str, str], grace_s: float) -> DrainPlan:
    """Decide how the app is drained.

    mode is `app.drain`: "auto" uses the shim when the command runs uvicorn in a way it can
    wrap; "shim" is the same but says in the description that it was asked for and why it
    could not apply; "sigterm" never changes the command. base_env is the environment the
    app will get (its PYTHONPATH is kept, after the shim's directory).
    """
    args = tuple(str(a) for a in argv)
    if mode not in MODES:
        raise ValueError(f"drain mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(grace_s, bool) or not isinstance(grace_s, int | float) or not math.isfinite(grace_s) \
            or grace_s < 0:
        raise ValueError(f"drain grace must be a number of seconds >= 0, got {grace_s!r}")
    if mode == "sigterm":
        return DrainPlan(args, {}, "sigterm", "SIGTERM only: app.drain is sigterm")
    try:
        new_argv, choice = _rewrite(args, base_env)
    except _NotApplicable as why:
        asked = "app.drain is shim, but " if mode == "shim" else ""
        return DrainPlan(args, {}, "sigterm", f"SIGTERM only: {asked}{why}")
    env = {"PYTHONPATH": _pythonpath(base_env.get("PYTHONPATH", "")), GRACE_ENV: f"{float(grace_s):g}"}
    if choice.startswith(SHIM_MODULE + ":"):
        how = f"--http {choice}"
    else:
        how = f"python -m {SHIM_MODULE}: --http {choice} -> {SHIM_MODULE}:{_HTTP_CLASSES[choice]}"
    description = f"proto4d drain shim ({how}; idle grace {float(grace_s):g}s)"
    return DrainPlan(new_argv, env, "shim", description)


def _pythonpath(existing: str) -> str:
    parts = [p for p in existing.split(os.pathsep) if p] if existing else []
    shim = str(SHIM_DIR)
    return os.pathsep.join([shim, *[p for p in parts if p != shim]])


def _basename(token: str) -> str:
    return token.rstrip("/").rsplit("/", 1)[-1]


def _rewrite(args: tuple[str, ...], env: Mapping[str, str]) -> tuple[tuple[str, ...], str]:
    """Return (argv running uvicorn through the shim, the --http choice) or raise _NotApplicable."""
    if not args:
        raise _NotApplicable("the command is empty")
    for i, tok in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else None
        module = nxt if tok == "-m" else (tok[2:] if tok.startswith("-m") and len(tok) > 2 else None)
        taken = 2 if tok == "-m" else 1
        if module == "uvicorn" or module == SHIM_MODULE:
            rest = args[i + taken:]
            choice = _check_uvicorn_args(rest, env)
            if module == SHIM_MODULE or choice.startswith(SHIM_MODULE + ":"):
                return args, choice  # already runs through the shim
            return (*args[:i], "-m", SHIM_MODULE, *rest), choice
        if module == "gunicorn" or _basename(tok) == "gunicorn":
            raise _NotApplicable("the command runs gunicorn, which stops its own workers")
        if _basename(tok) == "uvicorn":
            rest = args[i + 1:]
            choice = _check_uvicorn_args(rest, env)
            if choice.startswith(SHIM_MODULE + ":"):
                return args, choice
            return (*_python_for_script(args, i), "-m", SHIM_MODULE, *rest), choice
        if module is not None:
            break  # `-m something_else`: the rest are that module's arguments
    if any("uvicorn" in tok for tok in args):
        raise _NotApplicable("the command mentions uvicorn but not as `-m uvicorn` or a `uvicorn` program "
                             "(write it as {python} -m uvicorn ...)")
    raise _NotApplicable("the command is not uvicorn")


def _python_for_script(args: tuple[str, ...], i: int) -> tuple[str, ...]:
    """The argv prefix that runs `-m proto4d_drain` in place of the uvicorn script at args[i]."""
    tok = args[i]
    if i == 0:
        if "/" in tok:
            # A venv's bin/uvicorn runs with the python beside it.
            return (tok.rstrip("/").rsplit("/", 1)[0] + "/python",)
        raise _NotApplicable("the command runs a bare `uvicorn` from PATH, so the Python it uses is unknown "
                             "(write it as {python} -m uvicorn ...)")
    if _PYTHON_RE.match(_basename(args[0])) and all(a.startswith("-") for a in args[1:i]):
        return (args[0], *args[1:i])  # `python [opts] /venv/bin/uvicorn ...`
    if _basename(args[0]) in _RUNNERS and "run" in args[1:i]:
        return (*args[:i], "python")  # `uv run uvicorn ...`: the runner's environment has its python
    raise _NotApplicable(f"cannot tell which Python runs {tok!r} (write it as {{python}} -m uvicorn ...)")


def _check_uvicorn_args(rest: tuple[str, ...], env: Mapping[str, str]) -> str:
    """Validate uvicorn's own arguments for the shim; return the --http choice."""
    http = env.get("UVICORN_HTTP") or None
    workers = env.get("UVICORN_WORKERS") or None
    reload = (env.get("UVICORN_RELOAD") or "").lower() in ("1", "true", "yes", "on")
    for j, arg in enumerate(rest):
        if arg == "--":
            break
        value = rest[j + 1] if j + 1 < len(rest) else ""
        if arg == "--http":
            http = value
        elif arg.startswith("--http="):
            http = arg.split("=", 1)[1]
        elif arg == "--workers":
            workers = value
        elif arg.startswith("--workers="):
            workers = arg.split("=", 1)[1]
        elif arg == "--reload":
            reload = True
        elif arg == "--http2":
            raise _NotApplicable("--http2 selects uvicorn's zttp protocol, which the shim does not wrap")
    if reload:
        raise _NotApplicable("--reload runs the app in a child process that would not load the shim")
    if workers is not None and workers.strip() not in ("", "1"):
        raise _NotApplicable(f"--workers {workers} runs worker processes that would not load the shim")
    choice = http or "auto"
    if choice in _HTTP_CLASSES or (choice.startswith(SHIM_MODULE + ":")
                                   and choice.split(":", 1)[1] in _HTTP_CLASSES.values()):
        return choice
    raise _NotApplicable(f"--http {choice} is not one the shim wraps (auto, h11, httptools)")
