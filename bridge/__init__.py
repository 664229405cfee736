"""xdl-bridge: sharded parameter server for sparse embeddings, plugged into
unmodified PyTorch, TensorFlow and MXNet models.

The public names below are imported lazily, so ``import xdl`` stays cheap and never
imports a framework.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → module that defines it
_EXPORTS = {
    "connect": "xdl.client",
    "Client": "xdl.client",
    "Ticket": "xdl.client",
    "hookimpl": "xdl.hookspecs",
    "Backend": "xdl.backend",
    "get_plugin_manager": "xdl.plugins",
    "get_backend": "xdl.plugins",
    "load_plugin": "xdl.plugins",
    # the framework-neutral core
    "RemoteTable": "xdl.lookup",
    "GradientBuffer": "xdl.gradients",
    "DenseSync": "xdl.dense",
    "LayerAdapter": "xdl.adapter",
    "LayerSpec": "xdl.adapter",
    "swap": "xdl.surgery",
    "unswap": "xdl.surgery",
    "wrapper": "xdl.wrapper",
    "torch_wrapper": "xdl.wrapper",
    "tf_wrapper": "xdl.wrapper",
    "mxnet_wrapper": "xdl.wrapper",
    "embedding": "xdl.wrapper",
    "Lookup": "xdl.wrapper",
    "prefetch_batches": "xdl.wrapper",
    # PyTorch modules (import torch on first use)
    "DistributedEmbedding": "xdl.adapters.torch_nn",
    "DistributedEmbeddingBag": "xdl.adapters.torch_nn",
    "ServerDenseOptimizer": "xdl.adapters.torch_nn",
    "prefetch": "xdl.adapters.torch_nn",
}
_SUBMODULES = {"init", "optim", "errors", "protocol", "codec", "sharding", "datasets", "metrics",
               "lookup", "gradients", "dense", "surgery", "adapter", "backend", "plugins",
               "dedup"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"xdl.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xdl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
