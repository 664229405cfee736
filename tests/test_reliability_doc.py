"""docs/reliability.md names the tests that check its promises: each one must exist."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
# `tests/test_x.py::test_name[param]`, `tests/test_x.py`, or `::test_name` (same file as
# the last path named before it)
REF = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+)(?:\[[^\]]*\])?)?`")


def references() -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    current: str | None = None
    for m in REF.finditer(DOC.read_text()):
        path, name = m.group(1), m.group(2)
        if path is None and name is None:
            continue
        if path is not None:
            current = path
        assert current is not None, f"`::{name}` in {DOC.name} follows no test file"
        out.append((current, name))
    return out


def test_every_test_the_reliability_doc_names_exists() -> None:
    refs = references()
    assert len(refs) > 20  # the doc names its tests
    missing = []
    for path, name in refs:
        file = ROOT / path
        if not file.exists():
            missing.append(path)
        elif name is not None and not re.search(rf"^(async )?def {name}\(", file.read_text(),
                                                re.M):
            missing.append(f"{path}::{name}")
    assert not missing, f"{DOC.name} names tests that do not exist: {missing}"
