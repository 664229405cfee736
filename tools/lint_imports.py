"""Check the import contracts in ``.importlinter`` (import-linter) against this checkout.

grimp finds the package ``xdl`` by its folder, but this repository maps folders to
import names (``bridge/`` → ``xdl``, ``server/`` → ``xdl.server``, ``backends/`` →
``xdl.backends``, ``adapters/`` → ``xdl.adapters``), so a plain run would see only the
core. This script builds ``build/importlint/xdl/`` as real folders holding symlinks to
every ``.py`` file (grimp does not descend into symlinked folders), then runs
``lint-imports`` with ``PYTHONPATH=build/importlint``. Exit status: lint-imports'.

Usage: ``.venv/bin/python tools/lint_imports.py [lint-imports options, e.g. --verbose]``
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRROR = os.path.join(ROOT, "build", "importlint")
#: repository folder → folder of the mirror (import path with dots as slashes)
PACKAGES = {"bridge": "xdl", "server": "xdl/server", "backends": "xdl/backends",
            "adapters": "xdl/adapters"}


def build_mirror() -> None:
    """(Re)create the mirror tree of real folders with symlinked ``.py`` files."""
    shutil.rmtree(MIRROR, ignore_errors=True)
    for src, dst in PACKAGES.items():
        src_dir = os.path.join(ROOT, src)
        for here, dirs, files in os.walk(src_dir):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(here, src_dir)
            out = os.path.normpath(os.path.join(MIRROR, dst, rel))
            os.makedirs(out, exist_ok=True)
            for name in files:
                if name.endswith(".py"):
                    os.symlink(os.path.join(here, name), os.path.join(out, name))


def main(argv: list[str]) -> int:
    """Build the mirror and run lint-imports on it."""
    build_mirror()
    env = dict(os.environ)
    env["PYTHONPATH"] = MIRROR
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    cmd = [exe if os.path.exists(exe) else "lint-imports", os.path.join(ROOT, ".importlinter"),
           "--no-cache", *argv]
    return subprocess.call(cmd, cwd=MIRROR, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
