"""Unpack one tree of the mirror into a new release directory, in a short-lived process of its own.

    python -I <this file> GIT_DIR TREEISH DEST

`git archive` streams the tree as tar and tarfile unpacks it with the "data" filter (no absolute
paths, no links out of DEST, no device files). It runs apart from the daemon because tarfile
(which imports bz2 and lzma) would stay resident in the daemon for good once imported: Python never
gives a module back. Run by path with `-I`, so it imports nothing but the standard library (no
package directory on sys.path, no PYTHON* variables), whatever way proto4d was installed.

Exit 0 when the tree is written; EX_REPORTED with one line `proto4d-export: <message>` on stderr
(the operator's message, the daemon passes it on as it is) for a failure it understands; anything
else (killed, a bug) the daemon reports from the output's tail.
"""

from __future__ import annotations

import subprocess
import sys

EX_REPORTED = 3
PREFIX = "proto4d-export: "


def export(git_dir: str, treeish: str, dest: str) -> str | None:
    """Write the tree into `dest`; the operator's message on failure, None when done."""
    import tarfile  # here, not at the top: the daemon imports this module for its names and must not load tarfile

    sha7 = treeish[:7]
    git = subprocess.Popen(["git", "--git-dir", git_dir, "archive", "--format=tar", treeish],
                           stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert git.stdout is not None
    problem = None
    try:
        with tarfile.open(fileobj=git.stdout, mode="r|") as tar:
            for member in tar:
                tar.extract(member, dest, filter="data")
    except tarfile.TarError as e:
        problem = f"cannot unpack commit {sha7}: {e}"
    except OSError as e:
        problem = f"cannot write the release tree into {dest}: {e.strerror or e}"
    finally:
        if problem is not None and git.poll() is None:
            git.kill()
        git.stdout.close()
        code = git.wait()
    if problem is None and code != 0:
        problem = f"cannot export commit {sha7}: git archive exited with {code}"
    return problem


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: python -I {__file__} GIT_DIR TREEISH DEST", file=sys.stderr)
        return 2
    problem = export(*argv)
    if problem is None:
        return 0
    print(PREFIX + problem.replace("\n", " "), file=sys.stderr, flush=True)
    return EX_REPORTED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
