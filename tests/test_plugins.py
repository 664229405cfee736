"""The plugin system: hook documentation, entry points, validation, env switches."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pluggy
import pytest
from fakes import FakeClient

import xdl
from xdl import hookspecs, plugins
from xdl.errors import BackendNotAvailableError, PluginError

HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("xdl_"))

PLUGIN_SOURCE = '''
"""A third-party backend: numpy arrays wrapped in FancyTensor."""
import numpy as np
import xdl
from xdl.backends.numpy_backend import NumpyBackend


class FancyTensor:
    def __init__(self, array):
        self.array = np.asarray(array)


class FancyBackend(NumpyBackend):
    name = "fancy"

    def is_tensor(self, obj):
        return isinstance(obj, FancyTensor)

    def to_numpy(self, t):
        return t.array

    def from_numpy(self, a):
        return FancyTensor(a)


@xdl.hookimpl
def xdl_register_backends(register):
    register.add(FancyBackend)


@xdl.hookimpl
def xdl_detect_backend(obj):
    return "fancy" if isinstance(obj, FancyTensor) else None
'''


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("XDL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("XDL_BLOCKED_PLUGINS", raising=False)
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


@pytest.fixture
def fancy_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution ``xdl-fancy 0.3`` with entry point ``xdl: fancy``."""
    (tmp_path / "xdl_fancy.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "xdl_fancy-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xdl-fancy\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[xdl]\nfancy = xdl_fancy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("xdl_fancy", None)


# --------------------------------------------------------------------------- hookspecs


def test_markers_share_the_project_name() -> None:
    assert xdl.hookimpl is hookspecs.hookimpl
    assert hookspecs.hookimpl.project_name == hookspecs.hookspec.project_name == "xdl"
    assert plugins.ENTRY_POINT_GROUP == "xdl"
    assert "hookspec" not in dir(xdl)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_exact_signature(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    summary = doc.splitlines()[0] if doc else ""
    assert summary.endswith("."), f"{hook}: no one-line summary"
    documented = re.findall(r"^:param (\w+):", doc, re.MULTILINE)
    assert documented == list(inspect.signature(fn).parameters), hook
    opts = getattr(fn, "xdl_spec", {})
    assert ("Stops at first non-None result." in doc) == bool(opts.get("firstresult")), hook


def test_the_expected_hooks_exist() -> None:
    assert HOOKS == ["xdl_detect_backend", "xdl_register_adapters", "xdl_register_backends",
                     "xdl_register_optimizers"]
    assert hookspecs.xdl_detect_backend.xdl_spec["firstresult"] is True


# ------------------------------------------------------------------------------ loading


def test_builtins_load_as_plugins() -> None:
    names = [p["name"] for p in plugins.list_plugins()]
    assert names[-len(plugins.BUILTIN_PLUGINS):] == list(plugins.BUILTIN_PLUGINS)
    state = plugins.get_plugin_state()
    assert {"numpy", "torch"} <= set(state.backends.names())
    import torch

    adapter = state.adapters.get("torch_nn")
    assert isinstance(adapter, xdl.LayerAdapter) and adapter.backend == "torch"
    assert state.adapters.for_backend("torch") == [adapter]
    assert set(adapter.layer_types()) == {torch.nn.Embedding, torch.nn.EmbeddingBag}
    info = {p["name"]: p for p in plugins.list_plugins()}
    assert info["xdl.backends.torch_backend"]["hooks"] == [
        "xdl_detect_backend", "xdl_register_backends"]
    assert info["xdl.adapters.torch_nn"]["version"] == xdl.__version__
    assert info["xdl.optim"]["hooks"] == ["xdl_register_optimizers"]


def test_get_backend_by_name_and_by_object() -> None:
    import torch

    assert xdl.get_backend("torch") is xdl.get_backend(torch.zeros(1))
    assert xdl.get_backend(torch.nn.Linear(1, 1)).name == "torch"
    assert xdl.get_backend(np.zeros(2)).name == "numpy"
    with pytest.raises(PluginError, match="no backend named 'jax'.*numpy"):
        xdl.get_backend("jax")
    with pytest.raises(PluginError, match="no backend owns an object of type object"):
        xdl.get_backend(object())


def test_third_party_backend_through_an_entry_point(fancy_dist: Path) -> None:
    listed = plugins.list_plugins()
    assert listed[0] == {"name": "fancy", "version": "0.3",
                         "hooks": ["xdl_detect_backend", "xdl_register_backends"]}
    assert "fancy" in plugins.format_plugins()
    fancy_mod = sys.modules["xdl_fancy"]
    tensor = fancy_mod.FancyTensor(np.array([1, 2]))
    backend = xdl.get_backend(tensor)
    assert backend is xdl.get_backend("fancy") and backend.is_tensor(tensor)
    client = FakeClient()
    client.create_table("t", 3, initializer=xdl.init.Constant(0.5))
    out = backend.embedding(client, "t", np.array([[4, 4, 9]]))
    np.testing.assert_array_equal(out, np.full((1, 3, 3), 0.5, np.float32))
    assert client.pulls[0][1].tolist() == [4, 9]  # de-duplicated once


def test_disable_autoload_skips_entry_points(fancy_dist: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDL_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = [p["name"] for p in plugins.list_plugins()]
    assert names == list(plugins.BUILTIN_PLUGINS)
    with pytest.raises(PluginError, match="fancy"):
        xdl.get_backend("fancy")


def test_blocked_plugins(fancy_dist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDL_BLOCKED_PLUGINS", "fancy, xdl.backends.torch_backend")
    names = [p["name"] for p in plugins.list_plugins()]
    assert names == [n for n in plugins.BUILTIN_PLUGINS if n != "xdl.backends.torch_backend"]
    backends = plugins.get_plugin_state().backends.names()
    assert "numpy" in backends and "torch" not in backends and "fancy" not in backends


# --------------------------------------------------------------------------- validation


def _plugin(source: str) -> types.ModuleType:
    module = types.ModuleType("bad_plugin")
    exec(textwrap.dedent(source), module.__dict__)  # noqa: S102 - test-only module body
    return module


@pytest.mark.parametrize("source, message", [
    ("""
     import xdl
     @xdl.hookimpl
     def xdl_register_backend(register): pass
     """, r"plugin 'bad'.*'xdl_register_backend'.*not an xdl hook"),
    ("""
     def xdl_detect_backends(obj): pass
     """, r"plugin 'bad'.*'xdl_detect_backends'.*not an xdl hook"),
    ("""
     def xdl_detect_backend(obj): pass
     """, r"plugin 'bad'.*'xdl_detect_backend' without the @xdl.hookimpl marker"),
    ("""
     import xdl
     @xdl.hookimpl
     def xdl_register_backends(registry): pass
     """, r"plugin 'bad'.*xdl_register_backends.*registry"),
])
def test_malformed_plugins_fail_loudly(source: str, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        plugins.create_plugin_manager(autoload=False, extra_plugins=(("bad", _plugin(source)),))


def test_registry_rejects_non_backends() -> None:
    registry = plugins.BackendRegistry()
    with pytest.raises(PluginError, match="subclass of xdl.Backend"):
        registry.add(dict)  # type: ignore[arg-type]
    with pytest.raises(PluginError, match="has no 'name'"):
        registry.add(xdl.Backend)


def test_pluggy_is_the_engine() -> None:
    assert isinstance(xdl.get_plugin_manager(), pluggy.PluginManager)


# ---------------------------------------------------------------------- lazy frameworks


def test_no_framework_is_imported_by_loading_plugins() -> None:
    code = ("import sys, xdl\n"
            "from xdl import plugins\n"
            "print(plugins.format_plugins())\n"
            "xdl.get_backend('numpy')\n"
            "bad = [m for m in ('torch', 'tensorflow', 'mxnet') if m in sys.modules]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    backends = result.stdout.split("backends:")[1]
    assert "numpy" in backends and "torch" in backends
    assert "torch_nn (torch)" in result.stdout.split("adapters:")[1]


def test_missing_framework_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(BackendNotAvailableError, match=r"pip install 'xdl-bridge\[torch\]'"):
        xdl.get_backend("torch")
    with pytest.raises(ImportError, match=r"xdl-bridge\[torch\]"):
        from xdl.adapters import torch_nn

        torch_nn.__getattr__("DistributedEmbedding")
