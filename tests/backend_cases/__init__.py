"""Backend cases: what the backend-parametrised tests (tests/test_backend_core.py) need
to know about one framework.

The tests are written once against :class:`BackendCase`; each framework supplies one
subclass in a module of this package and names it in :data:`CASE_MODULES`. To add a
framework (TensorFlow / Keras, MXNet / Gluon):

1. write ``tests/backend_cases/<framework>_case.py`` with a ``CASE = MyCase()`` whose
   class implements every method below (models are small: ~20 rows, dim 4);
2. add ``"<framework>_case"`` to :data:`CASE_MODULES`.

A case whose framework is not installed is skipped, not failed.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import numpy as np

#: modules of this package defining ``CASE``; one line per framework
CASE_MODULES: tuple[str, ...] = ("torch_case", "tensorflow_case", "mxnet_case")

#: model kinds every case builds: the surgery must work on each
KINDS = ("sequential", "functional", "subclassed")
VOCAB, DIM, BATCH, LENGTH = 20, 4, 6, 3


class BackendCase:
    """One framework, as the shared tests see it. Batches are dicts of numpy arrays:
    ``"ids"`` int64 ``[BATCH, LENGTH]`` (index ids below ``VOCAB``) and ``"label"``
    float32 ``[BATCH]``."""

    #: the backend's registered name
    backend = ""
    #: module to import to run the case
    framework = ""

    def available(self) -> bool:
        """Whether the framework can be imported."""
        return importlib.util.find_spec(self.framework) is not None

    def build(self, kind: str, seed: int) -> Any:
        """A model of ``kind`` (see :data:`KINDS`): one ``VOCAB x DIM`` embedding layer
        looked up on ``batch["ids"]`` (mean over the ``LENGTH`` axis) and a dense head
        giving one logit per sample; weights seeded by ``seed`` (same seed, same model)."""
        raise NotImplementedError

    def logits(self, model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The model's output on ``batch`` as numpy (no training)."""
        raise NotImplementedError

    def optimizer(self, model: Any, lr: float) -> Any:
        """The framework's plain SGD over the model's trainable weights."""
        raise NotImplementedError

    def train_step(self, model: Any, optimizer: Any, batch: dict[str, np.ndarray]) -> float:
        """One step: sigmoid cross-entropy loss, backward, ``optimizer`` step; the loss."""
        raise NotImplementedError

    def embedding_rows(self, model: Any) -> np.ndarray:
        """The (ordinary) embedding layer's rows ``[VOCAB, DIM]``."""
        raise NotImplementedError

    def lookup_grads(self, backend: Any, remote: Any, ids: np.ndarray, offsets: Any,
                     combiner: str | None, upstream: np.ndarray) -> np.ndarray:
        """``backend.lookup`` (``combiner`` None) or ``backend.lookup_bags`` on ``remote``
        with framework tensors, then backward of ``sum(out * upstream)``; returns the
        forward output as numpy (the row gradients go to the remote's buffer)."""
        raise NotImplementedError


def cases() -> list[BackendCase]:
    """Every case of :data:`CASE_MODULES`."""
    return [importlib.import_module(f"{__name__}.{m}").CASE for m in CASE_MODULES]
