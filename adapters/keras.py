"""The Keras adapter: ``xdl.swap`` / ``xdl.unswap`` of ``keras.layers.Embedding`` in
Sequential, functional and subclassed models, for Keras 3 and for legacy Keras 2
(the ``tf-keras`` package, ``TF_USE_LEGACY_KERAS=1``).

The walk, table naming, options, table creation and export are the core's
(:mod:`xdl.surgery`); this module says how to list a Keras model's layers with their
paths, how to turn an ``Embedding`` into a distributed one and back, and how its
settings translate to a table.

**In place.** A functional model binds its layer objects into its graph when it is
built, so replacing an entry of ``model.layers`` would change nothing. The swap
changes each ``Embedding`` object itself: its class becomes a subclass of its own
class (``isinstance(layer, keras.layers.Embedding)`` keeps passing) whose ``call``
looks the ids up on the server, its ``embeddings`` variable is dropped, and a
one-element ``xdl_anchor`` variable (always zero, its gradient always zero) takes its
place among the trainable variables, so that the user's own ``fit`` computes the
rows' gradients (see :mod:`xdl.backends.tensorflow_backend`). ``compute_mask`` is the
layer's own, so ``mask_zero=True`` gives the same mask. The model's cached
``train_function`` / ``test_function`` / ``predict_function`` are reset, and XLA is
switched off for it (host callbacks cannot be compiled).

**Training is the user's.** ``model.compile(...)`` (any Keras optimizer for the dense
weights) and ``fit`` / ``evaluate`` / ``predict`` are unchanged; nothing overrides
``train_step`` or wraps the optimizer. A layer called several times per step gets one
push of the summed gradient, sent right after the optimizer's update (the anchor's
constraint, which Keras applies then), with the other tables' in one ``push_many``;
inside ``fit`` the step's lookups are pulled together, with one ``pull_many`` (see
:meth:`xdl.backends.tensorflow_backend.TensorFlowBackend.lookup`).
:func:`server_optimizer` translates a Keras optimizer to the server-side spec with that
Keras' semantics (Keras 3's Adagrad has epsilon inside the square root, tf-keras'
outside).

**Unswap** puts an ordinary ``Embedding`` back (same object, original class, a new
``embeddings`` variable holding the trained rows); the model then saves with
``model.save("m.keras")`` and exports with ``model.export(dir)`` as any Keras model.
Its compiled optimizer is replaced by a fresh one of the same configuration (the slots
it had were for the anchors; the rows' optimizer state stays on the server).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from xdl import init as xinit
from xdl import optim as xoptim
from xdl.errors import InvalidArgumentError, XdlError
from xdl.hookspecs import hookimpl
from xdl.lookup import RemoteTable
from xdl.surgery import LayerAdapter, LayerSpec

_KERAS_MODULES = ("keras", "tf_keras")


def _loaded_keras() -> list[Any]:
    """The Keras packages imported so far (none is imported here)."""
    return [m for m in (sys.modules.get(name) for name in _KERAS_MODULES)
            if m is not None and hasattr(m, "layers")]


def _is_legacy(layer: Any) -> bool:
    """Whether ``layer`` is a tf-keras (Keras 2) layer."""
    tf_keras = sys.modules.get("tf_keras")
    return tf_keras is not None and isinstance(layer, tf_keras.layers.Layer)


def _backend() -> Any:
    from xdl.plugins import get_backend

    return get_backend("tensorflow")


class DistributedEmbedding:
    """Mixin of the distributed ``Embedding`` classes :func:`xdl.swap` creates (one per
    Keras ``Embedding`` class, as a subclass of it).

    The layer holds no ``embeddings`` variable: rows live in :attr:`remote`'s table.
    ``call`` takes int or float ids of any shape (int32 ``[N, 1]`` inside ``fit``);
    :meth:`prefetch` pulls a coming batch's rows in the background.
    """

    _xdl_base: type
    _xdl_remote: RemoteTable
    _xdl_anchor: Any
    compute_dtype: Any

    @property
    def remote(self) -> RemoteTable:
        """The layer's :class:`xdl.lookup.RemoteTable` (client, table, prefetch)."""
        return self._xdl_remote

    @property
    def table(self) -> str:
        """Name of the server table holding the rows."""
        return self._xdl_remote.table

    @property
    def embeddings(self) -> Any:
        """Refused: the rows live on the parameter server."""
        raise AttributeError(
            f"distributed Embedding for table {self._xdl_remote.table!r} holds no embeddings "
            "variable; the rows live on the parameter server: use client.pull(table, ids), "
            "or xdl.unswap(model) to get ordinary Embedding layers with the trained rows")

    def call(self, inputs: Any) -> Any:
        """Embeddings of ``inputs`` (any shape) → ``inputs.shape + (output_dim,)``."""
        import tensorflow as tf

        ids = tf.convert_to_tensor(inputs)
        if not ids.dtype.is_integer:
            ids = tf.cast(ids, tf.int64)  # as Keras' Embedding, which casts to int
        out = _backend().lookup(self._xdl_remote, ids, anchor=self._xdl_anchor)
        dtype = tf.as_dtype(self.compute_dtype)
        return out if dtype == tf.float32 else tf.cast(out, dtype)

    def prefetch(self, ids: Any, *, exact: bool = True) -> None:
        """Pull the rows of a coming batch's ``ids`` in the background (see
        :meth:`xdl.lookup.RemoteTable.prefetch`)."""
        self._xdl_remote.prefetch(ids, exact=exact)

    def wait_pushes(self) -> None:
        """Push what is buffered for this table and wait until it is applied."""
        self._xdl_remote.wait_pushes()

    def close(self) -> None:
        """Flush and wait for pushes, stop the prefetch thread."""
        self._xdl_remote.close()

    def save_own_variables(self, store: Any) -> None:
        """Refused: save after ``xdl.unswap(model)`` (or checkpoint the server tables)."""
        raise XdlError(
            f"cannot save the distributed Embedding of table {self._xdl_remote.table!r}: its "
            "rows live on the parameter server. Call xdl.unswap(model) first to put "
            "ordinary Embedding layers back with the trained rows, or save the tables with "
            "client.save(path)", table=self._xdl_remote.table)


class _PushAfterUpdate:
    """The anchor's constraint: Keras applies a variable's constraint right after the
    optimizer's update, so this is where a layer's gradients are complete and are
    pushed: every table of the client at once (one ``push_many``; one push per table per
    step). Anchors are updated one by one, and a step's other lookups may hand over
    their gradients only after this anchor's update: then this constraint leaves the
    push to the one of the last anchor (:func:`~xdl.backends.tensorflow_backend.gradients_owed`),
    so that the step still makes one push. Without it they would be pushed before the
    table's next pull, just as exactly, only later."""

    def __init__(self, remote: RemoteTable) -> None:
        self.remote = remote

    def __call__(self, anchor: Any) -> Any:
        import tensorflow as tf

        remote = self.remote

        owed = _backend().gradients_owed

        def push(value: np.ndarray) -> np.ndarray:
            # every table of the client once the step's lookups have all handed over
            # their gradients: the model's tables go in one push_many; the other
            # anchors' constraints then find nothing to push
            if not owed(remote.client):
                remote.buffer.flush(remote.client)
            return value

        value = tf.convert_to_tensor(anchor)
        out = tf.numpy_function(push, [value], value.dtype, stateful=True, name="xdl_push")
        return tf.reshape(out, tf.shape(value))


_classes: dict[type, type] = {}


def _distributed_class(cls: type) -> type:
    """The distributed subclass of the Keras ``Embedding`` class ``cls`` (made once)."""
    made = _classes.get(cls)
    if made is None:
        made = _classes[cls] = type(f"Distributed{cls.__name__}", (DistributedEmbedding, cls),
                                    {"_xdl_base": cls, "__module__": __name__})
    return made


# ---------------------------------------------------------------- settings and values


def _initializer_spec(init: Any) -> xinit.Initializer | None:
    """A Keras initializer as an ``xdl.init`` spec, or None when it has no counterpart."""
    if init is None:
        return None
    name = type(init).__name__
    cfg = init.get_config() if hasattr(init, "get_config") else {}
    if name == "RandomUniform":
        return xinit.Uniform(low=cfg.get("minval", -0.05), high=cfg.get("maxval", 0.05))
    if name == "RandomNormal":
        return xinit.Normal(mean=cfg.get("mean", 0.0), stddev=cfg.get("stddev", 0.05))
    if name == "TruncatedNormal":
        return xinit.TruncatedNormal(mean=cfg.get("mean", 0.0), stddev=cfg.get("stddev", 0.05))
    if name == "Zeros":
        return xinit.Zeros()
    if name == "Ones":
        return xinit.Constant(value=1.0)
    if name == "Constant" and np.ndim(cfg.get("value", 0.0)) == 0:
        return xinit.Constant(value=float(cfg.get("value", 0.0)))
    return None


def _learning_rate(opt: Any, cfg: Mapping[str, Any]) -> float:
    lr = cfg.get("learning_rate")
    if isinstance(lr, (int, float, np.number)) and not isinstance(lr, bool):
        # Keras keeps it as a float32 variable: take the shortest decimal of that float32
        # (0.05, not 0.05000000074505806), the number the user wrote
        return float(str(np.float32(lr)))
    raise InvalidArgumentError(
        f"server_optimizer: {type(opt).__name__} has a learning-rate schedule "
        f"({type(opt.learning_rate).__name__}); server tables take a constant learning rate")


def server_optimizer(optimizer: Any) -> xoptim.Optimizer:
    """The server-side ``xdl.optim`` spec that updates rows as the Keras ``optimizer``
    would update them locally (Keras 3 or tf-keras; SGD with or without momentum,
    Adagrad, Adam, RMSprop, Ftrl).

    Keras 3's Adagrad divides by ``sqrt(accum + epsilon)``, tf-keras' by
    ``sqrt(accum) + epsilon``: the spec follows the Keras the optimizer belongs to.
    Server updates are sparse: Adam's step count and every slot advance only for the
    rows a step touches (lazy Adam), and ``weight_decay`` is not translated.
    """
    kind = type(optimizer).__name__
    cfg = optimizer.get_config()
    lr = _learning_rate(optimizer, cfg)
    legacy = type(optimizer).__module__.startswith("tf_keras")
    if cfg.get("weight_decay"):
        raise InvalidArgumentError(
            f"server_optimizer: {kind}(weight_decay={cfg['weight_decay']}) has no server "
            "counterpart here; give the table an xdl.optim spec with weight_decay instead")
    if kind == "SGD":
        momentum = float(cfg.get("momentum", 0.0))
        if momentum:
            return xoptim.Momentum.tensorflow(lr, momentum=momentum,
                                              nesterov=bool(cfg.get("nesterov", False)))
        return xoptim.SGD(lr=lr)
    if kind == "Adagrad":
        return xoptim.Adagrad.tensorflow(
            lr, initial_accumulator=float(cfg.get("initial_accumulator_value", 0.1)),
            eps=float(cfg.get("epsilon", 1e-7)), eps_inside_sqrt=not legacy)
    if kind == "Adam":
        if cfg.get("amsgrad"):
            raise InvalidArgumentError("server_optimizer: Adam(amsgrad=True) is not supported")
        return xoptim.Adam.tensorflow(lr, beta1=float(cfg.get("beta_1", 0.9)),
                                      beta2=float(cfg.get("beta_2", 0.999)),
                                      eps=float(cfg.get("epsilon", 1e-7)))
    if kind == "RMSprop":
        return xoptim.RMSProp.tensorflow(lr, rho=float(cfg.get("rho", 0.9)),
                                         momentum=float(cfg.get("momentum", 0.0)),
                                         eps=float(cfg.get("epsilon", 1e-7)),
                                         centered=bool(cfg.get("centered", False)))
    if kind == "Ftrl":
        return xoptim.FTRL.tensorflow(
            lr, lr_power=float(cfg.get("learning_rate_power", -0.5)),
            initial_accumulator=float(cfg.get("initial_accumulator_value", 0.1)),
            l1=float(cfg.get("l1_regularization_strength", 0.0)),
            l2=float(cfg.get("l2_regularization_strength", 0.0)),
            l2_shrinkage=float(cfg.get("l2_shrinkage_regularization_strength", 0.0)),
            beta=float(cfg.get("beta", 0.0)))
    raise InvalidArgumentError(
        f"server_optimizer: no server counterpart for Keras optimizer {kind}; use one of "
        "SGD, Adagrad, Adam, RMSprop, Ftrl, or give an xdl.optim spec")


# ---------------------------------------------------------------------- the walk


def _is_graph_model(layer: Any) -> bool:
    """Functional and Sequential models: their layers are found by name."""
    if getattr(layer, "_is_graph_network", False):  # tf-keras
        return True
    names = {c.__name__ for c in type(layer).__mro__}
    return bool(names & {"Functional", "Sequential"})


def _layers_in(value: Any, suffix: str, layer_type: type) -> Iterator[tuple[str, Any]]:
    if isinstance(value, layer_type):
        yield suffix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _layers_in(item, f"{suffix}.{key}", layer_type)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for i, item in enumerate(value):
            yield from _layers_in(item, f"{suffix}.{i}", layer_type)


def _children(layer: Any, layer_type: type) -> list[tuple[str, Any]]:
    """Direct sublayers of ``layer`` with their names: layer names in functional and
    Sequential models, attribute paths in subclassed ones (then any tracked sublayer
    not reached by a public attribute, by its name)."""
    found: list[tuple[str, Any]] = []
    if _is_graph_model(layer):
        found = [(child.name, child) for child in layer.layers]
    else:
        for attr, value in list(vars(layer).items()):
            if not attr.startswith("_"):
                found += [(attr + suffix, child)
                          for suffix, child in _layers_in(value, "", layer_type)]
    seen = {id(child) for _, child in found}
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is not None:
        found += [(child.name, child) for child in flatten(include_self=False, recursive=False)
                  if id(child) not in seen]
    return found


def _walk(layer: Any, path: str, layer_type: type, on_path: set[int]
          ) -> Iterator[tuple[str, Any]]:
    yield path, layer
    if id(layer) in on_path:  # a layer reachable from itself
        return
    on_path = on_path | {id(layer)}
    for name, child in _children(layer, layer_type):
        yield from _walk(child, f"{path}.{name}" if path else name, layer_type, on_path)


# ------------------------------------------------------------------- the adapter


class KerasAdapter(LayerAdapter):
    """Swaps ``keras.layers.Embedding`` (Keras 3 and tf-keras) in place."""

    name = "keras"
    backend = "tensorflow"
    #: Keras' ``Embedding`` default: ``RandomUniform(-0.05, 0.05)``
    default_initializer = xinit.Uniform(low=-0.05, high=0.05)

    def layer_types(self) -> tuple[type, ...]:
        """``Embedding`` of every Keras imported so far."""
        return tuple(k.layers.Embedding for k in _loaded_keras())

    def distributed_types(self) -> tuple[type, ...]:
        """:class:`DistributedEmbedding` (the mixin of every distributed class)."""
        return (DistributedEmbedding,)

    def named_layers(self, model: Any) -> Iterator[tuple[str, Any]]:
        """Layers with paths: names in functional / Sequential models, attribute paths in
        subclassed ones, joined by ``.``; ``""`` is the model itself."""
        layer_types = tuple(k.layers.Layer for k in _loaded_keras())
        return _walk(model, "", layer_types or object, set())  # type: ignore[arg-type]

    def layer_spec(self, layer: Any, path: str) -> LayerSpec:
        """``input_dim`` rows of ``output_dim``; the layer's initializer when it has an
        ``xdl.init`` counterpart. Constraints, LoRA and quantized layers are refused."""
        where = path or "the model"
        if getattr(layer, "embeddings_constraint", None) is not None:
            raise XdlError(f"cannot swap Embedding {where}: embeddings_constraint is not "
                           "applied by the server; remove it")
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            raise XdlError(f"cannot swap Embedding {where}: LoRA / quantized embeddings are "
                           "not supported")
        if getattr(layer, "sparse", False):
            raise XdlError(f"cannot swap Embedding {where}: sparse=True outputs are not "
                           "supported")
        return LayerSpec(num_rows=int(layer.input_dim), dim=int(layer.output_dim),
                         initializer=_initializer_spec(layer.embeddings_initializer),
                         settings={"legacy": _is_legacy(layer)})

    def layer_rows(self, layer: Any) -> np.ndarray:
        """The layer's current rows (building it first, as its first call would)."""
        if not layer.built:
            layer.build(None) if not _is_legacy(layer) else layer.build((None,))
        return np.asarray(layer.embeddings.numpy(), dtype=np.float32)

    def distribute(self, layer: Any, spec: LayerSpec, remote: RemoteTable) -> Any:
        """Turn ``layer`` itself into a distributed ``Embedding`` (see the module
        docstring) and return it."""
        cls = type(layer)
        if spec.settings.get("legacy"):
            if layer.built and getattr(layer, "embeddings", None) is not None:
                del layer.embeddings
            anchor = layer.add_weight(name="xdl_anchor", shape=(1,), initializer="zeros",
                                      trainable=True, dtype="float32",
                                      constraint=_PushAfterUpdate(remote))
        else:
            if layer.built and getattr(layer, "_embeddings", None) is not None:
                del layer._embeddings  # Keras untracks the variable
            layer._tracker.unlock()
            try:
                anchor = layer.add_weight(name="xdl_anchor", shape=(1,), initializer="zeros",
                                          trainable=True, dtype="float32",
                                          constraint=_PushAfterUpdate(remote))
            finally:
                layer._tracker.lock()
            layer.supports_jit = False  # host callbacks cannot be compiled by XLA
        layer.built = True
        object.__setattr__(layer, "_xdl_remote", remote)
        object.__setattr__(layer, "_xdl_anchor", anchor)
        layer.__class__ = _distributed_class(cls)
        return layer

    def restore(self, layer: Any, rows: np.ndarray) -> Any:
        """Turn the distributed ``layer`` back into its ``Embedding`` class, holding
        ``rows`` in a new ``embeddings`` variable; returns it."""
        base = type(layer)._xdl_base
        anchor = layer._xdl_anchor
        legacy = _is_legacy(layer)
        object.__delattr__(layer, "_xdl_remote")
        object.__delattr__(layer, "_xdl_anchor")
        layer.__class__ = base
        rows = np.ascontiguousarray(rows, dtype=np.float32)

        def initial(shape: Any, dtype: Any = None, **_: Any) -> Any:
            return rows

        if legacy:
            layer._trainable_weights = [w for w in layer._trainable_weights if w is not anchor]
            layer.embeddings = layer.add_weight(
                name="embeddings", shape=rows.shape, initializer=initial,
                regularizer=layer.embeddings_regularizer,
                constraint=layer.embeddings_constraint, experimental_autocast=False)
        else:
            layer._untrack_variable(anchor)
            layer._tracker.unlock()
            try:
                layer._embeddings = layer.add_weight(
                    name="embeddings", shape=rows.shape, initializer=initial,
                    regularizer=layer.embeddings_regularizer,
                    constraint=layer.embeddings_constraint, trainable=True)
            finally:
                layer._tracker.lock()
            layer.supports_jit = True
        return layer

    def replace(self, model: Any, path: str, new: Any) -> None:
        """Nothing to do: the layer was changed in place."""

    def rewire(self, model: Any, old: Any, new: Any, path: str) -> list[str]:
        """Nothing to rewire (the layer object stays); names an embedding regularizer,
        which the server cannot apply as Keras does."""
        if getattr(old, "embeddings_regularizer", None) is not None:
            return [f"the embeddings_regularizer of Embedding {path or 'model'} (Keras "
                    "penalises the whole table every step; it is dropped: use the table "
                    "optimizer's weight_decay, which decays only the rows a step touches)"]
        return []

    def finish(self, model: Any) -> Any:
        """Reset the model's cached train / test / predict functions (and XLA); an
        optimizer already built for the model's old variables is replaced by a fresh
        one of the same configuration (its slots belonged to variables that are gone:
        the embedding rows' optimizer state lives on the server)."""
        for attr in ("train_function", "test_function", "predict_function"):
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
        if getattr(model, "_jit_compile", False):
            model._jit_compile = False
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and (getattr(optimizer, "built", False)
                                      or getattr(optimizer, "_built", False)):
            fresh = type(optimizer).from_config(optimizer.get_config())
            build = getattr(fresh, "build", None)
            if callable(build):  # built for the new variables: model.save writes its slots
                build(model.trainable_variables)
            model.optimizer = fresh
            if any(isinstance(layer, DistributedEmbedding)
                   for _, layer in self.named_layers(model)):
                warnings.warn(
                    f"xdl.swap: the model's {type(optimizer).__name__} had been built for "
                    "its old variables; it was replaced by a fresh one of the same "
                    "configuration (its dense slots start again)", RuntimeWarning,
                    stacklevel=4)
        return model


@hookimpl
def xdl_register_adapters(register: Any) -> None:
    """Register the ``keras`` adapter (:class:`KerasAdapter`)."""
    register.add(KerasAdapter())
