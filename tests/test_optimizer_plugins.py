"""Server-side optimizers added by a plugin through ``xdl_register_optimizers``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

import xdl
from xdl import plugins
from xdl.errors import InvalidArgumentError
from xdl.server.table import SparseTable


@dataclass(frozen=True)
class SignSGD(xdl.optim.Optimizer):
    """w -= lr * sign(g), with a per-row count of updates in slot ``n``."""

    kind: ClassVar[str] = "sign_sgd"
    lr: float = 0.1

    def slot_names(self) -> list[str]:
        return ["n"]

    def slot_width(self, name: str, dim: int) -> int:
        return 1

    def update(self, values: Any, slots: dict[str, Any], rows: Any, grads: Any,
               step: int) -> None:
        values[rows] -= np.float32(self.lr) * np.sign(grads)
        slots["n"][rows] += 1


class SignPlugin:
    @xdl.hookimpl
    def xdl_register_optimizers(self, register: Any) -> None:
        register.add(SignSGD.kind, SignSGD)


@pytest.fixture
def with_plugin() -> Iterator[None]:
    plugins.reset_plugin_manager()
    xdl.load_plugin(SignPlugin(), name="sign-sgd")
    yield
    plugins.reset_plugin_manager()


def test_builtins_register_through_the_hook() -> None:
    names = plugins.get_plugin_state().optimizers.names()
    assert {"sgd", "momentum", "adagrad", "adam", "rmsprop", "ftrl"} <= set(names)


def test_plugin_optimizer_trains_a_table(with_plugin: None) -> None:
    spec = xdl.optim.from_dict({"kind": "sign_sgd", "lr": 0.5})
    assert isinstance(spec, SignSGD)
    table = SparseTable("t", 3, xdl.init.Zeros(), spec)
    keys = np.array([4, 9], np.int64)
    table.push(keys, np.array([[1, -2, 0], [-1, 3, 5]], np.float32))
    table.push(keys[:1], np.array([[1, 1, 1]], np.float32))
    np.testing.assert_array_equal(table.pull(keys), [[-1.0, 0.0, -0.5], [0.5, -0.5, -0.5]])
    exported = table.export()
    order = np.argsort(exported["keys"])
    np.testing.assert_array_equal(exported["slot:n"][order].ravel(), [2, 1])


def test_unknown_kind_names_what_is_registered(with_plugin: None) -> None:
    with pytest.raises(InvalidArgumentError, match="sign_sgd"):
        xdl.optim.from_dict({"kind": "lion", "lr": 0.1})


def test_optimizer_without_update_is_refused() -> None:
    @dataclass(frozen=True)
    class Lazy(xdl.optim.Optimizer):
        kind: ClassVar[str] = "lazy"
        lr: float = 0.1

    table = SparseTable("t", 2, xdl.init.Zeros(), Lazy())
    before = table.pull(np.array([1], np.int64)).copy()
    with pytest.raises(InvalidArgumentError, match="does not implement update"):
        table.push(np.array([1], np.int64), np.ones((1, 2), np.float32))
    np.testing.assert_array_equal(table.pull(np.array([1], np.int64)), before)
