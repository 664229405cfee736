"""The code blocks of docs/tensorflow.md run as written, top to bottom in one namespace."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from xdl import plugins

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
pytestmark = pytest.mark.timeout(180)

DOC = Path(__file__).resolve().parent.parent / "docs" / "tensorflow.md"


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE)


def test_tensorflow_doc_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = python_blocks(DOC)
    assert len(code) == 7  # a block that stops being ```python is not silently skipped
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs.tensorflow"}
    plugins.reset_plugin_manager()
    try:
        for i, block in enumerate(code):
            exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)  # noqa: S102
    finally:
        client = namespace.get("client")
        if client is not None:
            client.close()  # type: ignore[attr-defined]
        plugins.reset_plugin_manager()
    assert (tmp_path / "m.keras").exists() and (tmp_path / "exported").is_dir()
    assert not [t for t in threading.enumerate() if t.name.startswith("xdl-prefetch")]
