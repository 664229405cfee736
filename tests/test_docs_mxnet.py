"""The code blocks of docs/mxnet.md run as written, top to bottom as one program."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from xdl import plugins

pytestmark = pytest.mark.timeout(120)

DOC = Path(__file__).resolve().parent.parent / "docs" / "mxnet.md"


def test_mxnet_doc_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.DOTALL | re.MULTILINE)
    assert len(code) == 6  # a block that stops being ```python is not silently skipped
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs.mxnet"}
    try:
        for i, block in enumerate(code):
            exec(compile(block, f"mxnet.md[block {i}]", "exec"), namespace)  # noqa: S102
    finally:
        client = namespace.get("client")
        if client is not None:
            client.close()  # type: ignore[attr-defined]
        plugins.reset_plugin_manager()
    assert not [t for t in threading.enumerate() if t.name.startswith("xdl-prefetch")]
