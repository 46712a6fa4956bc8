"""Releases on disk: the git mirror, exported trees, venvs, shared links, the `current` switch.

Capistrano's layout: every release is a complete tree under `releases/`, built in a temp
dir and renamed into place, so a release dir that exists is a release that is whole;
`current` is a symlink moved by an atomic rename, so rollback is a rename too. Venvs are
content-addressed by (requirements, python) under `venvs/` and shared by the releases that
need the same one. Everything here is blocking; the daemon calls it from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proto4d import exporttree, faults, fsutil, log
from proto4d.config import Config, find_uv
from proto4d.paths import Paths
from proto4d.procs import Cancel, CommandFailed, PidRegistry
from proto4d.procs import run as run_cmd

RELEASE_PREFIX = "proto4"
RELEASE_RE = re.compile(rf"^{RELEASE_PREFIX}_(\d{{8}})_(\d{{6}})_([0-9a-f]{{7}})(?:_(\d+))?$")
VENV_FORMAT = "1"  # bump to force new venvs when the way they are built changes
Progress = Callable[[str], None]


class ReleaseError(Exception):
    """A step of preparing a release failed; the message is for the operator."""


# --------------------------------------------------------------------------- git


class GitFailed(Exception):
    """A local git command exited non-zero (or could not run); `stderr` says why."""

    def __init__(self, args: Sequence[str], stderr: str) -> None:
        self.stderr = stderr
        super().__init__(f"git {' '.join(args)}: {stderr.strip()[-500:]}")


class Mirror:
    """A bare clone of `app.repo` under `state/repo.git`, fetched before every update.

    Only the configured branch lands (in refs/remotes/origin/<branch>), and tags in refs/tags/*:
    on a case-insensitive file system (APFS by default) two upstream branches that differ only
    in case would collide as loose refs and fail every fetch. A request naming another branch
    fetches that one on demand. Each release's commit is pinned under refs/proto4d/ so a
    force-push upstream never loses what runs.

    Every git operation is the `git` program, run from an argv list: a library in the daemon
    (GitPython was one) would stay resident for good after the first update, and the export's
    tarfile too, which is why the export runs in a process of its own (exporttree.py).
    """

    # A local query (rev-parse, log, update-ref) takes milliseconds; a hung one must not stall an update.
    LOCAL_TIMEOUT_S = 120

    def __init__(self, path: Path, url: str, branch: str = "") -> None:
        self.path = path
        self.url = url
        self.branch = branch
        self._ready = False
        # Answers of local queries, kept until the next fetch (the only thing here that moves a ref
        # or brings a commit): an update asks some twice (at the request, then when preparing), each
        # a git process of a few milliseconds. remote.origin.url as last written, to write it only when it changed.
        self._memo: dict[tuple[str, ...], object] = {}
        self._url_written: str | None = None

    @property
    def url(self) -> str:
        return self._url

    @url.setter
    def url(self, url: str) -> None:
        self._url = url
        log.redact_url(url)
        # The mirror's config (a readable file) holds the URL without its credentials; git gets the
        # real one from an `insteadOf` rule in the fetch's own environment (readable by this user only).
        self.safe_url = log.scrub(url)
        self._git_env = {"GIT_TERMINAL_PROMPT": "0"}
        if self.safe_url != url:
            self._git_env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.{url}.insteadOf",
                                  "GIT_CONFIG_VALUE_0": self.safe_url})

    def _git(self, *args: str, timeout: float | None = None) -> str:
        """A local git command on the mirror: its stdout (stripped); GitFailed when it fails.

        Local commands never reach the origin, so they get no credentials in their environment.
        """
        self._ensure()
        return self._run_local(["--git-dir", str(self.path), *args], timeout)

    def _run_local(self, args: Sequence[str], timeout: float | None = None) -> str:
        try:
            r = subprocess.run(["git", *args], capture_output=True, text=True, errors="replace",
                               stdin=subprocess.DEVNULL, timeout=timeout or self.LOCAL_TIMEOUT_S,
                               env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        except subprocess.TimeoutExpired:
            raise GitFailed(args, f"timed out after {timeout or self.LOCAL_TIMEOUT_S:g} s") from None
        except OSError as e:  # no git on PATH
            raise GitFailed(args, str(e.strerror or e)) from None
        if r.returncode != 0:
            raise GitFailed(args, r.stderr)
        return r.stdout.strip()

    def _ensure(self) -> None:
        if self._ready:
            return
        if not (self.path / "HEAD").exists():
            tmp = self.path.with_name(self.path.name + ".tmp")
            fsutil.remove_tree(tmp)
            try:
                self._run_local(["init", "--quiet", "--bare", str(tmp)])
            except GitFailed as e:
                raise ReleaseError(f"cannot create the git mirror {self.path}: {_git_error_text(e.stderr)}") from None
            os.replace(tmp, self.path)
        self._clear_stale_locks()
        self._ready = True

    def _clear_stale_locks(self) -> None:
        # A daemon killed mid-fetch leaves *.lock files that would fail every later fetch; only
        # this daemon (which holds state/daemon.lock) ever touches the mirror, so they are stale.
        for lock in list(self.path.glob("*.lock")) + list((self.path / "refs").rglob("*.lock")):
            with contextlib.suppress(OSError):
                lock.unlink()

    def refspecs(self, branch: str | None = None) -> list[str]:
        branch = self.branch if branch is None else branch
        heads = [f"+refs/heads/{branch}:refs/remotes/origin/{branch}"] if branch else \
            ["+refs/heads/*:refs/remotes/origin/*"]
        return [*heads, "+refs/tags/*:refs/tags/*"]

    def fetch(self, cancel: Cancel | None = None, timeout: float = 600, branch: str | None = None) -> None:
        faults.point_sync("fetch", cancel)
        self._memo.clear()
        if self._url_written != self.safe_url or not self._ready:
            try:
                self._git("config", "remote.origin.url", self.safe_url)
            except GitFailed as e:
                raise ReleaseError(f"cannot configure the git mirror {self.path}: "
                                   f"{_git_error_text(e.stderr)}") from None
            self._url_written = self.safe_url
        # git runs in its own process group with our own deadline, killed with its group on cancel.
        try:
            run_cmd(["git", "--git-dir", str(self.path), "fetch", "--prune", "--force", "--no-write-fetch-head",
                     "origin", *self.refspecs(branch)], cancel=cancel, timeout=timeout,
                    env={**os.environ, **self._git_env}, kind="git")
        except CommandFailed as e:
            raise ReleaseError(f"cannot fetch {self.safe_url}: {_git_error_text(e.tail)}") from None
        except OSError as e:  # no git on PATH (launchd's PATH is short)
            raise ReleaseError(f"cannot run git to fetch {self.safe_url}: {e.strerror or e}") from None
        if cancel is not None:
            cancel.check()

    def resolve(self, ref: str) -> str | None:
        """A branch, tag or (abbreviated) commit -> full commit sha, or None.

        fetch() brings only the configured branch, so a request naming another branch fetches
        that branch here, each time it is resolved (it may have moved, or gone: then its stale
        remote-tracking ref is dropped and the name no longer resolves).
        """
        if not ref or ref.startswith("-") or any(c.isspace() for c in ref):
            return None
        if ref != self.branch and self._may_be_other_branch(ref):
            self._fetch_other_branch(ref)
        return self._resolve_local(ref)

    def _may_be_other_branch(self, ref: str) -> bool:
        if ref.startswith("refs/") or self._has_ref(f"refs/tags/{ref}"):
            return False
        # a commit id already here needs no fetch
        return not (re.fullmatch(r"[0-9a-f]{7,40}", ref) and self.has_commit(ref))

    def _has_ref(self, name: str) -> bool:
        try:
            self._git("rev-parse", "--verify", "--quiet", name)
            return True
        except GitFailed:
            return False

    def _fetch_other_branch(self, branch: str) -> None:
        self._ensure()
        self._memo.clear()
        try:
            run_cmd(["git", "--git-dir", str(self.path), "fetch", "--force", "--no-write-fetch-head", "origin",
                     f"+refs/heads/{branch}:refs/remotes/origin/{branch}"], timeout=300,
                    env={**os.environ, **self._git_env}, kind="git")
        except CommandFailed as e:
            if "couldn't find remote ref" in e.tail.lower():  # gone upstream: forget what we knew of it
                with contextlib.suppress(GitFailed):
                    self._git("update-ref", "-d", f"refs/remotes/origin/{branch}")
        except OSError:
            pass

    def _resolve_local(self, ref: str) -> str | None:
        for cand in (f"refs/remotes/origin/{ref}", f"refs/tags/{ref}", ref):
            try:
                return self._git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{cand}^{{commit}}")
            except GitFailed:
                continue
        return None

    def _memoised(self, key: tuple[str, ...], ask: Callable[[], object]) -> object:
        if key not in self._memo:
            self._memo[key] = ask()
        return self._memo[key]

    def branch_head(self, branch: str) -> str | None:
        def ask() -> str | None:
            try:
                return self._git("rev-parse", "--verify", "--quiet", f"refs/remotes/origin/{branch}^{{commit}}")
            except GitFailed:
                return None
        return self._memoised(("branch_head", branch), ask)  # type: ignore[return-value]

    def has_commit(self, sha: str) -> bool:
        def ask() -> bool:
            try:
                self._git("cat-file", "-e", f"{sha}^{{commit}}")
                return True
            except GitFailed:
                return False
        return bool(self._memoised(("has_commit", sha), ask))

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        def ask() -> bool:
            try:
                self._git("merge-base", "--is-ancestor", ancestor, descendant)
                return True
            except GitFailed:
                return False
        return bool(self._memoised(("is_ancestor", ancestor, descendant), ask))

    def log_between(self, old: str | None, new: str, limit: int = 50) -> list[str]:
        spec = f"{old}..{new}" if old and self.has_commit(old) else new
        try:
            out = self._git("log", "--format=%h %s (%an, %ad)", "--date=short", f"-{limit}", spec)
        except GitFailed:
            return []
        return [line for line in out.splitlines() if line.strip()]

    def subject(self, sha: str) -> str:
        def ask() -> str:
            try:
                return self._git("log", "-1", "--format=%s", sha)
            except GitFailed:
                return ""
        return str(self._memoised(("subject", sha), ask))

    def pin(self, name: str, sha: str) -> None:
        with contextlib.suppress(GitFailed):
            self._git("update-ref", f"refs/proto4d/releases/{name}", sha)

    def unpin(self, name: str) -> None:
        with contextlib.suppress(GitFailed):
            self._git("update-ref", "-d", f"refs/proto4d/releases/{name}")

    def export(self, sha: str, subdir: str, dest: Path, cancel: Cancel | None = None,
               registry: PidRegistry | None = None, timeout: float = 600) -> None:
        """Write the tree of `subdir` at `sha` into the (new, empty) directory `dest`.

        What `subdir` is at `sha` is asked only when the export fails (to say why): one git process less
        on every update's way from trigger to verified."""
        treeish = f"{sha}:{subdir}" if subdir else f"{sha}^{{tree}}"

        def not_a_tree() -> None:
            try:
                kind = self._git("cat-file", "-t", treeish)
            except GitFailed:
                raise ReleaseError(f"app.subdir {subdir!r} does not exist at commit {sha[:7]}") from None
            if kind != "tree":
                raise ReleaseError(f"app.subdir {subdir!r} is a file at commit {sha[:7]}, not a directory")

        self._ensure()
        helper = Path(exporttree.__file__)
        try:
            run_cmd([sys.executable, "-I", str(helper), str(self.path), treeish, str(dest)], cancel=cancel,
                    registry=registry, kind="export", timeout=timeout,
                    env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        except CommandFailed as e:
            if cancel is not None:
                cancel.check()  # killed because the daemon stops: not the release's fault
            not_a_tree()
            said = [ln[len(exporttree.PREFIX):] for ln in e.tail.splitlines() if ln.startswith(exporttree.PREFIX)]
            if e.code == exporttree.EX_REPORTED and said:
                raise ReleaseError(said[-1]) from None
            raise ReleaseError(f"cannot export commit {sha[:7]}: {_git_error_text(e.tail)}") from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
                # Recording the helper in state/app.pids failed: that is the same disk under root the tree goes to.
                raise ReleaseError(f"cannot write the release tree into {dest}: {e.strerror or e}") from None
            raise ReleaseError(f"cannot run {sys.executable} to export commit {sha[:7]}: {e.strerror or e}") from None


def _git_error_text(text: str) -> str:
    text = text.strip()
    if text.startswith("stderr:"):
        text = text[len("stderr:"):].strip().strip("'")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.lower().startswith(("fatal:", "error:"))]
    return (fatal[0] if fatal else lines[-1] if lines else text)[:500]


# --------------------------------------------------------------------------- venvs


# Homebrew keeps each installed version under <prefix>/Cellar/<formula>/<version>/ and points
# <prefix>/opt/<formula> at the current one; `brew upgrade` (and `brew cleanup`) delete the old
# version's directory. A path through opt/ follows upgrades; a Cellar path dangles after one.
_CELLAR = re.compile(r"^(?P<prefix>/.*)/Cellar/(?P<formula>[^/]+)/(?P<version>[^/]+)/(?P<rest>.+)$")


def stable_interpreter(path: str) -> str:
    """The path to record for an interpreter: resolved, but never into a versioned Cellar directory.

    `realpath` of Homebrew's python3 is `<prefix>/Cellar/python@3.12/3.12.7/...`, which the next
    `brew upgrade` removes; the same file through `<prefix>/opt/python@3.12/...` survives it.
    """
    real = os.path.realpath(path)
    m = _CELLAR.match(real)
    if m:
        stable = f"{m['prefix']}/opt/{m['formula']}/{m['rest']}"
        if os.path.realpath(stable) == real:
            return stable
    return real


# python_identity's answers, by the interpreter file that gave them (see there).
_IDENTITY: dict[tuple[str, tuple[int, int, int, int]], tuple[str, str]] = {}


def _remember(cache: dict[Any, Any], key: Any, value: Any, limit: int = 32) -> None:
    """Keep an answer in one of this module's caches of the daemon's life, emptied past `limit` entries
    (a long-lived daemon meets a few interpreters and venvs, not thousands)."""
    if len(cache) > limit:
        cache.clear()
    cache[key] = value


def _file_stamp(path: str, follow: bool = True) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def python_identity(python: str) -> tuple[str, str]:
    """(stable path, version) of an interpreter: half of a venv's key.

    Asking costs a start of the interpreter (30-100 ms on a busy machine), and every update asked
    twice. The answer is kept while the file it came from is unchanged (an upgrade in place
    changes its inode or mtime; a Homebrew upgrade changes where the path resolves to), and only
    when that file is the interpreter itself: a wrapper script (a pyenv shim) may answer for
    another interpreter tomorrow without changing, so it is asked every time.
    """
    exe = shutil.which(python) or python
    real = os.path.realpath(exe)
    stamp = _file_stamp(real)
    key = (real, stamp) if stamp is not None else None
    if key is not None and key in _IDENTITY:
        executable, version = _IDENTITY[key]
        return stable_interpreter(executable), version
    try:
        out = subprocess.run([exe, "-c", "import sys; print(sys.executable); print(sys.version.split()[0])"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError) as e:
        raise ReleaseError(f"python: cannot run {python!r}: {e}") from None
    executable, version = out[0].strip() or exe, out[1].strip()
    if key is not None and version and os.path.realpath(executable) == real:
        _remember(_IDENTITY, key, (executable, version), limit=16)
    return stable_interpreter(executable), version


def _stabilise_venv(venv: Path) -> None:
    """Point a new venv's interpreter links and pyvenv.cfg through opt/ rather than a Cellar version.

    `python -m venv` and uv link bin/python to the base interpreter as they resolve it, which for
    Homebrew can be the Cellar path: after `brew upgrade` every such venv has a dangling bin/python.
    """
    bindir = venv / "bin"
    for link in bindir.iterdir() if bindir.is_dir() else ():
        if not link.is_symlink():
            continue
        target = os.readlink(link)
        absolute = os.path.normpath(os.path.join(link.parent, target))
        if "/Cellar/" not in os.path.realpath(absolute):
            continue
        stable = stable_interpreter(absolute)
        if stable != os.path.realpath(absolute):
            tmp = link.with_name(f".{link.name}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(stable, tmp)
            os.replace(tmp, link)
    cfg = venv / "pyvenv.cfg"
    if cfg.is_file():
        lines = []
        for line in cfg.read_text().splitlines():
            key, sep, value = line.partition("=")
            value = value.strip()
            if sep and key.strip() in ("home", "executable", "base-executable") and "/Cellar/" in value:
                m = _CELLAR.match(value)
                if m:
                    opt = f"{m['prefix']}/opt/{m['formula']}/{m['rest']}"
                    if os.path.realpath(opt) == os.path.realpath(value):
                        line = f"{key.strip()} = {opt}"
            lines.append(line)
        cfg.write_text("\n".join(lines) + "\n")


# Venvs whose interpreter ran, with the stamps of what that proved: venv -> stamps.
_VENV_RAN: dict[str, tuple[object, ...]] = {}


def venv_problem(venv: Path, timeout: float = 30) -> str | None:
    """Why the venv's interpreter cannot run (None when it runs): checked before starting or switching
    to a release, so a venv left dangling by an interpreter upgrade is rebuilt, not exec'd.

    Running the interpreter costs a start of it at every update, during the switch's preparation; a
    venv that ran is not asked again while its interpreter file, the link to it and venv.json are
    unchanged (an upgrade in place or a rebuild changes one of them). The run is in the background
    class like the rest of the preparation."""
    python = venv_python(venv)
    if not (venv / "venv.json").is_file():
        return f"{venv.name}: no venv.json (removed or never finished)"
    if not python.exists():  # follows the link to the interpreter the venv was built from
        target = os.readlink(python) if python.is_symlink() else ""
        return (f"{python} -> {target}: the interpreter it was built from is gone (upgraded or removed)"
                if target else f"{python} is missing")
    # The interpreter the link leads to, the link itself, and the venv's own records.
    stamps = (_file_stamp(str(python)), _file_stamp(str(python), follow=False), _file_stamp(str(venv / "venv.json")),
              _file_stamp(str(venv / "pyvenv.cfg")))
    if None not in stamps and _VENV_RAN.get(str(venv)) == stamps:
        return None
    try:
        run_cmd([str(python), "-c", "import sys, encodings"], timeout=timeout)
    except CommandFailed as e:
        return f"{python} exits {e.code}: {e.tail.strip()[-300:]}"
    except OSError as e:
        return f"{python} cannot run: {e}"
    if None not in stamps:
        _remember(_VENV_RAN, str(venv), stamps)
    return None


def venv_key(requirements: bytes, python_real: str, python_version: str) -> str:
    h = hashlib.sha256()
    for part in (VENV_FORMAT.encode(), python_real.encode(), python_version.encode(), requirements):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


@dataclass
class VenvResult:
    key: str
    path: Path
    reused: bool
    installer: str
    seconds: float


def ensure_venv(paths: Paths, requirements_file: Path | None, python: str, installer: str, *,
                progress: Progress, cancel: Cancel | None = None, registry: PidRegistry | None = None,
                bytecode: bool = False) -> VenvResult:
    """Return the venv for (requirements, python), building it in a temp dir if it is new.

    bytecode: the app cannot write into the venv (it runs as `app.user`): compile its packages here,
    once, or every start of the app compiles what it imports again."""
    started = time.monotonic()
    req = requirements_file.read_bytes() if requirements_file is not None else b""
    real, version = python_identity(python)
    key = venv_key(req, real, version)
    final = paths.venvs / key
    if (final / "venv.json").exists():
        info = fsutil.read_json(final / "venv.json") if bytecode else None
        if isinstance(info, dict) and not info.get("bytecode"):  # built before app.user was set
            _compile_bytecode(final, _build_env(final), progress, cancel, registry)
            fsutil.atomic_write_json(final / "venv.json", {**info, "bytecode": True})
            progress(f"venv {key} reused, its packages compiled for app.user")
        else:
            progress(f"venv {key} reused (same requirements and Python {version})")
        return VenvResult(key, final, True, "reused", time.monotonic() - started)
    uv = find_uv() if installer in ("auto", "uv") else None
    tool = "uv" if uv else "pip"
    tmp = paths.venvs / f".build-{key}-{os.getpid()}"
    fsutil.remove_tree(tmp)
    progress(f"venv {key}: building with {tool} (Python {version}) ...")
    env = _build_env(tmp)

    def out(line: str) -> None:
        if line.strip():
            progress("  | " + line)

    try:
        if uv:
            run_cmd([uv, "venv", "--quiet", "--python", real, str(tmp)], cancel=cancel, env=env, on_line=out,
                    registry=registry, kind="build")
            if req.strip():
                run_cmd([uv, "pip", "install", "--python", str(venv_python(tmp)), "-r", str(requirements_file)],
                        cancel=cancel, env=env, on_line=out, registry=registry, kind="build")
        else:
            run_cmd([real, "-m", "venv", str(tmp)], cancel=cancel, env=env, on_line=out, registry=registry,
                    kind="build")
            if req.strip():
                run_cmd([str(venv_python(tmp)), "-m", "pip", "install", "--no-input", "-r", str(requirements_file)],
                        cancel=cancel, env=env, on_line=out, registry=registry, kind="build")
        if bytecode:
            _compile_bytecode(tmp, env, progress, cancel, registry)
        _fix_scripts(tmp, final)
        _stabilise_venv(tmp)
        _no_world_write(tmp)
        faults.point_sync("venv", cancel)
        info = {"key": key, "python": real, "python_version": version, "installer": tool,
                "created_at": time.time(), "requirements_sha256": hashlib.sha256(req).hexdigest(),
                "bytecode": bytecode}
        fsutil.atomic_write_json(tmp / "venv.json", info)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / "venv.json").exists():  # another builder won the race: same content, use theirs
                fsutil.remove_tree(tmp)
            else:
                raise
    except CommandFailed as e:
        fsutil.remove_tree(tmp)
        how = tool
        if e.code < 0:  # killed: say by what (SIGXFSZ = the file size limit, SIGKILL = the OOM killer...)
            with contextlib.suppress(ValueError):
                how = f"{tool} killed by {signal.Signals(-e.code).name}"
        raise ReleaseError(f"installing {requirements_file.name if requirements_file else 'the venv'} failed "
                           f"({how}): {_last_error(e.tail)}") from None
    except BaseException:
        fsutil.remove_tree(tmp)
        raise
    seconds = time.monotonic() - started
    progress(f"venv {key} built in {seconds:.1f} s")
    return VenvResult(key, final, False, tool, seconds)


def _last_error(tail: str) -> str:
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    marks = [i for i, ln in enumerate(lines)
             if "error" in ln.lower() or "not find" in ln.lower() or "no matching" in ln.lower()]
    # The error lines, and what follows the last one: uv explains there which requirement failed
    # ("error: No solution found ..." then "Because <package> was not found ...").
    pick = [lines[i] for i in marks[-2:]] + lines[marks[-1] + 1:marks[-1] + 4] if marks else lines[-2:]
    return " / ".join(pick)[-600:]


def _build_env(venv: Path) -> dict[str, str]:
    """The environment of the installers and the compile: the daemon's, without what would point them
    at another interpreter's packages, and never prompting."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "UV_PYTHON_DOWNLOADS": "never",
           "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def _compile_bytecode(venv: Path, env: dict[str, str], progress: Progress, cancel: Cancel | None,
                      registry: PidRegistry | None) -> None:
    """Compile the venv's packages once, so no start of an app running as `app.user` compiles them.

    uv installs no bytecode, and an app that runs as `app.user` cannot write it into the daemon's venv:
    every start (the canary, the one start of a release, a crash restart) compiled its dependencies
    from source, about half of the start's CPU (Proto4's imports 3.3-3.6 -> 1.6-1.9 s; the sample app
    0.30 -> 0.15 s). Not done otherwise: an app running as the daemon's user writes the bytecode of what
    it imports at its first start, far less than all of a venv (Proto4's: 7 s of CPU, which would put
    its venv build over 5 s). Built in the temp dir and renamed, the .pyc stay valid: Python checks a
    source's mtime and size, and sets the code's file name from where it imported it.
    A file that does not compile (a package's Python 2 test data) is left to compile at import, if
    it is ever imported; a compile killed (the file size limit, a cancel) fails the build like any step."""
    try:
        run_cmd([str(venv_python(venv)), "-m", "compileall", "-qq", "-j", "0", str(venv / "lib")],
                cancel=cancel, env=env, registry=registry, kind="build")
    except CommandFailed as e:
        if e.code < 0:
            raise
        progress("bytecode: some files of the venv do not compile; they compile at import, if ever imported")


def _no_world_write(tree: Path) -> None:
    """Clear the others-write bit in a built venv: uv creates its `.lock` 0666 whatever the umask."""
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                if st.st_mode & stat.S_IWOTH and not stat.S_ISLNK(st.st_mode):
                    os.chmod(p, stat.S_IMODE(st.st_mode) & ~stat.S_IWOTH)


def _fix_scripts(tmp: Path, final: Path) -> None:
    # Console scripts carry their venv's absolute path in the shebang; built in a temp dir and
    # renamed, they would point at the temp dir. Rewrite them so `bin/pip` etc. keep working.
    old, new = str(tmp).encode(), str(final).encode()
    for script in (tmp / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        try:
            data = script.read_bytes()
        except OSError:
            continue
        if old in data[:4096]:
            mode = script.stat().st_mode
            script.write_bytes(data.replace(old, new))
            os.chmod(script, mode)
    cfg = tmp / "pyvenv.cfg"
    if cfg.exists():
        cfg.write_bytes(cfg.read_bytes().replace(old, new))


# Venvs whose site-packages were found to hold every requirement: (venv, names) -> the directories' stamps.
_INSTALLED: dict[tuple[str, tuple[str, ...]], tuple[tuple[str, int, int], ...]] = {}


def _site_stamp(venv: Path) -> tuple[tuple[str, int, int], ...]:
    """The inode and mtime of each site-packages directory of `venv`: installing or removing a package
    adds or removes its entries there (its .dist-info directory), which changes the directory's mtime."""
    out = []
    for d in sorted(venv.glob("lib*/python*/site-packages")):
        with contextlib.suppress(OSError):
            st = d.stat()
            out.append((str(d), st.st_ino, st.st_mtime_ns))
    return tuple(out)


def check_installed(venv: Path, requirements_file: Path | None) -> list[str]:
    """Names from the requirements file that the venv does not have (the preflight's last look).

    Looking costs a start of the venv's interpreter (~0.1 s on a busy machine), on every update,
    although with unchanged requirements the venv is the one the serving release runs. A venv found
    complete is not asked again while its site-packages directories are unchanged."""
    if requirements_file is None:
        return []
    names = requirement_names(requirements_file.read_text(errors="replace"))
    if not names:
        return []
    key = (os.path.realpath(venv), tuple(names))
    stamp = _site_stamp(venv)
    if stamp and _INSTALLED.get(key) == stamp:
        return []
    # Each distribution's metadata lies in site-packages: read there, every name is usually found without
    # starting the interpreter. Only a name not found that way is asked of the interpreter itself (a
    # distribution on another path of its sys.path), so reading the files can make nothing "missing".
    found = _installed_names(stamp)
    if found is not None and all(_canonical(n) in found for n in names):
        _remember(_INSTALLED, key, stamp)
        return []
    script = ("import sys, importlib.metadata as m\n"
              "for n in sys.argv[1:]:\n"
              "    try: m.distribution(n)\n"
              "    except m.PackageNotFoundError: print(n)\n")
    try:
        out = subprocess.run([str(venv_python(venv)), "-c", script, *names], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return [f"(cannot run the venv's python: {e})"]
    missing = [n for n in out.split() if n]
    if not missing and stamp:
        _remember(_INSTALLED, key, stamp)
    return missing


def _canonical(name: str) -> str:
    """PEP 503's normalized name: Foo_Bar.baz and foo-bar-baz are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_names(stamp: tuple[tuple[str, int, int], ...]) -> set[str] | None:
    """The normalized names of the distributions in these site-packages directories (from each
    .dist-info's METADATA or .egg-info's PKG-INFO `Name:` line); None when none could be read."""
    names: set[str] = set()
    for site, _ino, _mtime in stamp:
        try:
            entries = os.listdir(site)
        except OSError:
            continue
        for entry in entries:
            meta = "METADATA" if entry.endswith(".dist-info") else "PKG-INFO" if entry.endswith(".egg-info") else ""
            if not meta:
                continue
            try:
                with open(os.path.join(site, entry, meta), encoding="utf-8", errors="replace") as f:
                    for _ in range(20):  # Name: is among the first headers
                        line = f.readline()
                        if line.startswith("Name:"):
                            names.add(_canonical(line[5:].strip()))
                            break
                        if not line.strip():
                            break
            except OSError:
                continue
    return names or None


def requirement_names(text: str) -> list[str]:
    names = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m and "://" not in line:
            names.append(m.group(1))
    return names


# --------------------------------------------------------------------------- releases


@dataclass
class Release:
    name: str
    path: Path
    info: dict

    @property
    def commit(self) -> str:
        return str(self.info.get("commit", ""))

    @property
    def venv(self) -> str:
        return str(self.info.get("venv", ""))

    @property
    def created_at(self) -> float:
        return float(self.info.get("created_at") or 0)

    @property
    def outcome(self) -> str:
        return str(self.info.get("outcome", "unknown"))


def disk_name(paths: Paths, name: str) -> str | None:
    """The release's name as its directory is spelled on disk, matched without regard to case.

    APFS (macOS's default) is case-insensitive: `releases/PROTO4_...` opens `proto4_...`, and a
    name taken as typed would then be compared, linked and pinned in a spelling no listing shows,
    so retention could not recognise the release that serves. An exact match wins (a
    case-sensitive file system may hold both spellings).
    """
    if not name or "/" in name or name.startswith("."):
        return None
    entries = _entries(paths)
    if name in entries:
        return name
    folded = name.casefold()
    matches = [e for e in entries if e.casefold() == folded]
    return matches[0] if len(matches) == 1 else None


def _entries(paths: Paths) -> list[str]:
    try:
        return [e for e in os.listdir(paths.releases) if not e.startswith(".")]
    except OSError:
        return []


def read_release(paths: Paths, name: str) -> Release | None:
    found = disk_name(paths, name)
    if found is None:
        return None
    name = found
    path = paths.release(name)
    info = fsutil.read_json(path / "release.json")
    if not isinstance(info, dict):
        return None
    return Release(name, path, info)


def list_releases(paths: Paths) -> list[Release]:
    """Complete releases, newest first (temp dirs of an interrupted build are not releases)."""
    out = []
    if not paths.releases.is_dir():
        return out
    for entry in paths.releases.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        rel = read_release(paths, entry.name)
        if rel is not None:
            out.append(rel)
    out.sort(key=lambda r: (r.created_at, r.name), reverse=True)
    return out


def set_outcome(paths: Paths, name: str, outcome: str, **extra: object) -> None:
    rel = read_release(paths, name)
    if rel is None:
        return
    rel.info["outcome"] = outcome
    rel.info.setdefault("history", []).append({"at": time.time(), "outcome": outcome, **extra})
    rel.info["history"] = rel.info["history"][-20:]
    fsutil.atomic_write_json(rel.path / "release.json", rel.info)


def note_info(paths: Paths, name: str, **fields: object) -> None:
    """Add facts to a release's release.json (its schema revision, whether a rollback to it is code-only)."""
    rel = read_release(paths, name)
    if rel is None:
        return
    rel.info.update(fields)
    fsutil.atomic_write_json(rel.path / "release.json", rel.info)


def new_release_name(paths: Paths, sha: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now if now is not None else time.time()))
    base = f"{RELEASE_PREFIX}_{stamp}_{sha[:7]}"
    name, n = base, 1
    while paths.release(name).exists() or paths.releases.joinpath(f".tmp-{name}").exists():
        n += 1
        name = f"{base}_{n}"
    return name


def cleanup_partial(paths: Paths) -> list[str]:
    """Remove temp dirs left by an interrupted export or venv build; return what went."""
    removed = []
    for parent, prefix in ((paths.releases, ".tmp-"), (paths.venvs, ".build-")):
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            if entry.name.startswith(prefix):
                fsutil.remove_tree(entry)
                removed.append(str(entry))
    for tmp in paths.root.glob(".current.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(str(tmp))
    return removed


@dataclass
class Prepared:
    release: Release
    venv: VenvResult


def prepare_release(cfg: Config, paths: Paths, mirror: Mirror, sha: str, ref: str, *, progress: Progress,
                    cancel: Cancel | None = None, registry: PidRegistry | None = None,
                    timings: dict[str, float] | None = None, extra: dict[str, object] | None = None) -> Prepared:
    """Export `sha`, build or reuse its venv, link shared paths, preflight; rename into releases/.

    `extra`: more facts for its release.json (ahead.py's record of a release prepared ahead).

    On any failure nothing is left behind: the temp dir goes and the live tree is untouched.
    """
    timings = timings if timings is not None else {}
    name = new_release_name(paths, sha)
    tmp = paths.releases / f".tmp-{name}"
    fsutil.ensure_dir(paths.releases)
    try:
        t = time.monotonic()
        tmp.mkdir()
        progress(f"export {sha[:7]} ({mirror.subject(sha)}) -> releases/{name}")
        mirror.export(sha, cfg.app.subdir, tmp, cancel, registry)
        faults.point_sync("export", cancel)
        timings["export"] = time.monotonic() - t
        if cancel is not None:
            cancel.check()

        t = time.monotonic()
        req_file = None
        if cfg.app.requirements:
            req_file = tmp / cfg.app.requirements
            if not req_file.is_file():
                raise ReleaseError(f"app.requirements {cfg.app.requirements!r} is not in the release "
                                   f"(commit {sha[:7]})")
        venv = ensure_venv(paths, req_file, cfg.python, cfg.update.installer, progress=progress, cancel=cancel,
                           registry=registry, bytecode=bool(cfg.app.user))
        timings["venv"] = time.monotonic() - t
        if cancel is not None:
            cancel.check()

        t = time.monotonic()
        link_shared(tmp, paths.shared, cfg.app.shared, progress)
        workdir = tmp / cfg.app.workdir
        if not workdir.is_dir():
            raise ReleaseError(f"app.workdir {cfg.app.workdir!r} is not a directory in the release")
        problems = preflight(cfg, paths, tmp, venv.path, req_file)
        if problems:
            raise ReleaseError("preflight: " + "; ".join(problems))
        timings["preflight"] = time.monotonic() - t

        py_real, py_version = python_identity(cfg.python)
        info = {
            "name": name, "commit": sha, "ref": ref, "branch": cfg.app.branch, "subject": mirror.subject(sha),
            "created_at": time.time(), "venv": venv.key, "requirements_sha256":
                hashlib.sha256(req_file.read_bytes()).hexdigest() if req_file else "",
            "python": py_real, "python_version": py_version, "outcome": "prepared",
            "history": [{"at": time.time(), "outcome": "prepared"}], **(extra or {}),
        }
        fsutil.atomic_write_json(tmp / "release.json", info)
        final = paths.release(name)
        os.rename(tmp, final)
        fsutil.fsync_dir(paths.releases)
        mirror.pin(name, sha)
        progress(f"release {name} ready")
        return Prepared(Release(name, final, info), venv)
    except BaseException:
        with contextlib.suppress(OSError):
            fsutil.remove_tree(tmp)
        raise


def link_shared(release: Path, shared_root: Path, shared: Iterable[str], progress: Progress) -> None:
    """Replace each shared path in the release by a symlink into `shared/` (seeded on first use).

    A shared path is linked whether or not it exists yet: an app that creates its SQLite file
    on first start must create it in `shared/`, never inside a release that retention will
    delete with everything written to it. A missing file gets a dangling link whose parent
    exists (SQLite and open() create the target through it); a missing directory is created.
    """
    for rel in shared:
        target = shared_root / rel
        inside = release / rel
        if not target.exists() and not target.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            if inside.exists():
                # First release to need it: the repo's copy becomes the shared one.
                shutil.copytree(inside, target, symlinks=True) if inside.is_dir() else shutil.copy2(inside, target)
                progress(f"shared {rel}: seeded from the release")
            elif _looks_like_dir(rel):
                target.mkdir(parents=True)
                progress(f"shared {rel}: created empty directory")
            else:
                progress(f"shared {rel}: not there yet; linked, so the app creates it in shared/{rel}")
        if inside.exists() or inside.is_symlink():
            fsutil.remove_tree(inside)
        inside.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, inside)


def _looks_like_dir(rel: str) -> bool:
    """`data`, `uploads/` are directories; `.env`, `app.db` are files (a name with a dot)."""
    name = Path(rel.rstrip("/")).name
    return rel.endswith("/") or (not name.startswith(".") and "." not in name)


def env_keys(text: str) -> set[str]:
    keys = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key = line.split("=", 1)[0].strip()
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            keys.add(key)
    return keys


def preflight(cfg: Config, paths: Paths, release: Path, venv: Path, req_file: Path | None) -> list[str]:
    problems = []
    free = fsutil.free_bytes(paths.root)
    if free < cfg.update.min_free_mb * 1024 * 1024:
        problems.append(f"only {free // (1024 * 1024)} MB free under {paths.root} "
                        f"(update.min_free_mb is {cfg.update.min_free_mb})")
    for rel in cfg.app.shared:
        if Path(rel).name != ".env":
            continue
        example = next((release / (rel + suffix) for suffix in (".example", ".sample")
                        if (release / (rel + suffix)).is_file()), None)
        if example is None:
            continue
        shared_env = paths.shared / rel
        have = env_keys(shared_env.read_text(errors="replace")) if shared_env.is_file() else set()
        missing = sorted(env_keys(example.read_text(errors="replace")) - have)
        if missing:
            problems.append(f"keys listed in {rel + example.suffix} are missing from shared/{rel}: "
                            f"{', '.join(missing)}")
    missing_pkgs = check_installed(venv, req_file)
    if missing_pkgs:
        problems.append(f"requirements not installed in the venv: {', '.join(missing_pkgs)}")
    return problems


def switch_current(paths: Paths, name: str) -> None:
    fsutil.atomic_symlink(Path("releases") / name, paths.current)


def python_for(paths: Paths, release: Release) -> Path:
    return venv_python(paths.venvs / release.venv)


def is_installer_output(text: str) -> bool:
    """A progress line that is the installer's own output (pip/uv), not a step: the update log keeps it,
    the daemon's log does not."""
    return text.startswith("  |")


def repair_venv(cfg: Config, paths: Paths, release: Release, *, progress: Progress,
                cancel: Cancel | None = None, registry: PidRegistry | None = None) -> Release:
    """Make sure `release`'s venv runs before it is started or switched to; rebuild it when not.

    The rebuilt venv may get a new key (a new interpreter path or version): release.json then
    records it. A broken venv under the same key is moved aside first (the `.build-` prefix makes
    the next start's cleanup remove it), so a venv.json cannot make ensure_venv reuse it.
    """
    venv = paths.venvs / release.venv if release.venv else None
    problem = venv_problem(venv) if venv is not None else "the release names no venv"
    if problem is None:
        return release
    progress(f"the venv of {release.name} cannot run ({problem}); rebuilding it")
    req = release.path / cfg.app.requirements if cfg.app.requirements else None
    real, version = python_identity(cfg.python)
    key = venv_key(req.read_bytes() if req is not None and req.is_file() else b"", real, version)
    broken = paths.venvs / key
    if broken.exists():
        aside = paths.venvs / f".build-broken-{key}-{os.getpid()}"
        fsutil.remove_tree(aside)
        os.rename(broken, aside)
    result = ensure_venv(paths, req if req is not None and req.is_file() else None, cfg.python,
                         cfg.update.installer, progress=progress, cancel=cancel, registry=registry,
                         bytecode=bool(cfg.app.user))
    problem = venv_problem(result.path)
    if problem is not None:
        raise ReleaseError(f"the rebuilt venv of {release.name} cannot run either: {problem}")
    if result.key != release.venv:
        release.info["venv"] = result.key
        fsutil.atomic_write_json(release.path / "release.json", release.info)
    return release

