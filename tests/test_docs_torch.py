"""The code blocks of docs/writing-a-backend.md and docs/pytorch.md run as written."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from xdl import plugins

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("name, blocks", [("writing-a-backend.md", 6), ("pytorch.md", 8)])
def test_doc_code_blocks_run(name: str, blocks: int, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = DOCS / name
    code = python_blocks(path)
    assert len(code) == blocks  # a block that stops being ```python is not silently skipped
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs.{path.stem}"}
    before = set(threading.enumerate())
    plugins.reset_plugin_manager()
    try:
        for i, block in enumerate(code):
            exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)  # noqa: S102
    finally:
        client = namespace.get("client")
        if client is not None:
            client.close()  # type: ignore[attr-defined]
        plugins.reset_plugin_manager()
    started = set(threading.enumerate()) - before  # other tests' threads are theirs
    assert not [t for t in started if t.name.startswith("xdl-prefetch")]
