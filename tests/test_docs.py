"""The README's and docs' Python examples run as written (docs must match the code)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks() -> list[tuple[str, int, str]]:
    out = []
    for path in DOCS:
        for i, m in enumerate(BLOCK.finditer(path.read_text())):
            out.append((path.relative_to(ROOT).as_posix(), i, m.group(1)))
    return out


@pytest.mark.parametrize("doc, index, code", blocks(),
                         ids=[f"{d}#{i}" for d, i, _ in blocks()])
def test_python_block_runs(doc: str, index: int, code: str, tmp_path: pathlib.Path) -> None:
    if "# not run" in code:
        pytest.skip("block marked '# not run'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"{doc} block {index} failed:\n{proc.stderr[-3000:]}"


def test_readme_documents_every_cli_command() -> None:
    from xdl.cli import _parser

    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert f"xdl {name}" in readme, f"README does not mention `xdl {name}`"


def test_readme_lists_every_environment_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    used = set()
    for folder in ("bridge", "server", "backends", "adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r"\bXDL_[A-Z_]+\b", path.read_text()))
    missing = sorted(v for v in used if f"`{v}`" not in readme)
    assert not missing, f"README's variable table lacks {missing}"
