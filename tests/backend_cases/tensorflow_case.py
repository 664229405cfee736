"""The TensorFlow (Keras 3) case of the backend-parametrised tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import DIM, LENGTH, VOCAB, BackendCase


def _modules() -> Any:
    import keras
    import tensorflow as tf

    class Subclassed(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.emb = keras.layers.Embedding(VOCAB, DIM)
            self.head = keras.layers.Dense(1)

        def call(self, ids: Any) -> Any:
            return self.head(tf.reduce_mean(self.emb(ids), 1))

    return tf, keras, Subclassed


class TensorFlowCase(BackendCase):
    """Keras 3 ``Sequential``, functional ``keras.Model`` and a subclassed model; the
    embedding layer is named ``emb`` (its path in all three)."""

    backend = "tensorflow"
    framework = "tensorflow"

    def build(self, kind: str, seed: int) -> Any:
        tf, keras, Subclassed = _modules()
        keras.utils.set_random_seed(seed)
        if kind == "subclassed":
            model = Subclassed()
        else:
            emb = keras.layers.Embedding(VOCAB, DIM, name="emb")
            mean = keras.layers.GlobalAveragePooling1D()
            head = keras.layers.Dense(1)
            if kind == "sequential":
                model = keras.Sequential([keras.Input((LENGTH,), dtype="int64"), emb, mean,
                                          head])
            else:
                ids = keras.Input((LENGTH,), dtype="int64")
                model = keras.Model(ids, head(mean(emb(ids))))
        model(np.zeros((1, LENGTH), np.int64))  # built: its rows exist
        return model

    def logits(self, model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(model(batch["ids"], training=False)).reshape(-1).copy()

    def optimizer(self, model: Any, lr: float) -> Any:
        _, keras, _ = _modules()
        return keras.optimizers.SGD(lr)

    def train_step(self, model: Any, optimizer: Any, batch: dict[str, np.ndarray]) -> float:
        tf, _, _ = _modules()
        with tf.GradientTape() as tape:
            logits = tf.reshape(model(batch["ids"], training=True), [-1])
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
                labels=batch["label"], logits=logits))
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return float(loss)

    def embedding_rows(self, model: Any) -> np.ndarray:
        _, keras, _ = _modules()
        (layer,) = [m for m in model._flatten_layers()
                    if isinstance(m, keras.layers.Embedding)]
        return np.asarray(layer.embeddings.numpy()).copy()

    def lookup_grads(self, backend: Any, remote: Any, ids: np.ndarray, offsets: Any,
                     combiner: str | None, upstream: np.ndarray) -> np.ndarray:
        tf, _, _ = _modules()
        anchor = backend.anchor()
        with tf.GradientTape() as tape:
            if combiner is None:
                out = backend.lookup(remote, tf.constant(ids))
            else:
                out = backend.lookup_bags(
                    remote, tf.constant(ids), None if offsets is None else tf.constant(offsets),
                    combiner=combiner)
            loss = tf.reduce_sum(out * upstream)
        tape.gradient(loss, anchor)
        return np.asarray(out.numpy()).copy()


CASE = TensorFlowCase()
