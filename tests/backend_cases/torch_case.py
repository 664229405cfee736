"""The PyTorch case of the backend-parametrised tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import DIM, VOCAB, BackendCase


def _modules() -> Any:
    import torch
    from torch import nn

    class Subclassed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, DIM)
            self.head = nn.Linear(DIM, 1)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids).mean(1)).squeeze(-1)

    class Mean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(1)

    return torch, nn, Subclassed, Mean


class TorchCase(BackendCase):
    """``nn.Sequential``, a ``torch.fx`` traced ``GraphModule`` (torch's functional
    model: a graph calling submodules by path) and a subclassed ``nn.Module``."""

    backend = "torch"
    framework = "torch"

    def build(self, kind: str, seed: int) -> Any:
        torch, nn, Subclassed, Mean = _modules()
        torch.manual_seed(seed)
        if kind == "sequential":
            return nn.Sequential(nn.Embedding(VOCAB, DIM), Mean(), nn.Linear(DIM, 1),
                                 nn.Flatten(0))
        model = Subclassed()
        if kind == "functional":
            return torch.fx.symbolic_trace(model)
        return model

    def logits(self, model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
        torch = _modules()[0]
        with torch.no_grad():
            return model(torch.from_numpy(batch["ids"])).numpy().copy()

    def optimizer(self, model: Any, lr: float) -> Any:
        torch = _modules()[0]
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def train_step(self, model: Any, optimizer: Any, batch: dict[str, np.ndarray]) -> float:
        torch = _modules()[0]
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(torch.from_numpy(batch["ids"])), torch.from_numpy(batch["label"]))
        loss.backward()
        optimizer.step()
        return float(loss.item())

    def embedding_rows(self, model: Any) -> np.ndarray:
        _, nn, _, _ = _modules()
        (layer,) = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        return layer.weight.detach().numpy().copy()

    def lookup_grads(self, backend: Any, remote: Any, ids: np.ndarray, offsets: Any,
                     combiner: str | None, upstream: np.ndarray) -> np.ndarray:
        torch = _modules()[0]
        t_ids = torch.from_numpy(ids)
        if combiner is None:
            out = backend.lookup(remote, t_ids)
        else:
            out = backend.lookup_bags(remote, t_ids,
                                      None if offsets is None else torch.from_numpy(offsets),
                                      combiner=combiner)
        (out * torch.from_numpy(upstream)).sum().backward()
        return out.detach().numpy().copy()


CASE = TorchCase()
