"""The ``tf.nn`` surface: distributed ``embedding_lookup`` and
``embedding_lookup_sparse`` with TensorFlow's signatures, for functional TF code.

``params`` is a :class:`DistributedTable` (from :func:`table`), a ``tf.Module`` that
stands for a server table where ``tf.nn`` takes a variable. Its only variable is a
one-element anchor (always zero; see :mod:`xdl.backends.tensorflow_backend`), so a
module holding the table lists it in ``trainable_variables`` and
``tape.gradient(loss, module.trainable_variables)`` hands the rows' gradients to the
push; the rows themselves are updated on the server by the table's optimizer. Works
eagerly and inside ``tf.function``::

    item = xdl.adapters.tf_nn.table(client, "item", dim=16)
    emb = xdl.adapters.tf_nn.embedding_lookup(item, ids)                  # [..., 16]
    bag = xdl.adapters.tf_nn.embedding_lookup_sparse(item, sp_ids, None)  # [bags, 16]
"""

from __future__ import annotations

from typing import Any

from xdl.errors import InvalidArgumentError
from xdl.lookup import RemoteTable

_table_class: Any = None


def _backend() -> Any:
    from xdl.plugins import get_backend

    return get_backend("tensorflow")


def _module_class() -> Any:
    """``DistributedTable`` (a ``tf.Module`` subclass; made on first use, so that this
    plugin does not import TensorFlow)."""
    global _table_class
    if _table_class is None:
        tf = _backend().framework_module()

        class DistributedTable(tf.Module):  # type: ignore[misc,name-defined]
            """A server table as ``tf.nn`` lookups see it (see :func:`table`).

            :ivar remote: the :class:`xdl.lookup.RemoteTable` (client, table, prefetch).
            :ivar anchor: the one-element trainable variable the rows' gradients flow
                through (always zero).
            """

            def __init__(self, remote: RemoteTable, name: str | None = None) -> None:
                super().__init__(name=name)
                self.remote = remote
                with tf.init_scope():
                    self.anchor = tf.Variable([0.0], trainable=True, name="xdl_anchor")

            @property
            def dim(self) -> int:
                """Row width."""
                return self.remote.dim

            def wait_pushes(self) -> None:
                """Push what is buffered for the table and wait until it is applied."""
                self.remote.wait_pushes()

            def close(self) -> None:
                """Flush and wait for pushes, stop the prefetch thread."""
                self.remote.close()

        _table_class = DistributedTable
    return _table_class


def table(client: Any, name: str, dim: int, *, initializer: Any = None, optimizer: Any = None,
          seed: int | None = None, id_mode: str = "hash", num_rows: int | None = None,
          padding_idx: int | None = None, sync_push: bool = True) -> Any:
    """A ``DistributedTable`` for table ``name`` (created on the server if needed).

    :param id_mode: ``"hash"`` (raw int64 feature hashes) or ``"index"`` (row numbers
        below ``num_rows``, checked).
    :param padding_idx: id whose lookup is zeros with no gradient (left out of bags).
    :param sync_push: wait for the table's pushes before its next pull (training then
        equals local training step for step).
    """
    options = {k: v for k, v in (("initializer", initializer), ("optimizer", optimizer),
                                  ("seed", seed)) if v is not None}
    client.create_table(name, dim, **options)
    remote = RemoteTable(client, name, dim, id_mode=id_mode, num_rows=num_rows,
                         padding_idx=padding_idx, sync_push=sync_push,
                         name=f"tf.nn lookup of table {name!r}")
    return _module_class()(remote, name=_module_name(name))


def _module_name(table_name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in table_name)
    return cleaned if cleaned[:1].isalpha() else f"t_{cleaned}"


def _the_table(params: Any, what: str) -> Any:
    if isinstance(params, (list, tuple)):
        if len(params) != 1:
            raise InvalidArgumentError(
                f"{what}: a distributed table is one DistributedTable, got a list of "
                f"{len(params)} (the server shards the rows itself)")
        params = params[0]
    if not isinstance(params, _module_class()):
        raise InvalidArgumentError(
            f"{what}: params must be an xdl DistributedTable (xdl.adapters.tf_nn.table), got "
            f"{type(params).__name__}; for a local variable use tf.nn.{what}")
    return params


def embedding_lookup(params: Any, ids: Any, max_norm: float | None = None,
                     name: str | None = None) -> Any:
    """``tf.nn.embedding_lookup`` on a distributed table: ``ids.shape + (dim,)``.

    :param params: a ``DistributedTable`` (or a list holding one).
    :param ids: int32 / int64 ids of any shape, eager or symbolic.
    :param max_norm: not supported (must be None).
    :param name: name scope of the ops.
    """
    t = _the_table(params, "embedding_lookup")
    if max_norm is not None:
        raise InvalidArgumentError("embedding_lookup: max_norm is not supported on a "
                                   "distributed table", table=t.remote.table)
    tf = _backend().framework_module()
    with tf.name_scope(name or "xdl_embedding_lookup"):
        return _backend().lookup(t.remote, ids, anchor=t.anchor)


def embedding_lookup_sparse(params: Any, sp_ids: Any, sp_weights: Any, combiner: str | None = None,
                            max_norm: float | None = None, name: str | None = None,
                            allow_fast_lookup: bool = False) -> Any:
    """``tf.nn.embedding_lookup_sparse`` on a distributed table: one combined row per row
    of ``sp_ids`` (a ``tf.SparseTensor`` ``[bags, ...]`` in canonical order), ``[bags, dim]``.

    :param sp_weights: None, or a ``tf.SparseTensor`` of weights with ``sp_ids``'
        indices: ``sum`` is the weighted sum, ``mean`` divides by the sum of the
        weights, ``sqrtn`` by the root of the sum of their squares.
    :param combiner: ``"sum"``, ``"mean"`` (default, as TensorFlow) or ``"sqrtn"``.
    :param max_norm: not supported (must be None).
    :param allow_fast_lookup: accepted for signature compatibility; no effect.
    """
    t = _the_table(params, "embedding_lookup_sparse")
    combiner = combiner or "mean"
    if combiner not in ("sum", "mean", "sqrtn"):
        raise InvalidArgumentError(
            f"embedding_lookup_sparse: combiner must be 'sum', 'mean' or 'sqrtn', got "
            f"{combiner!r}", table=t.remote.table)
    if max_norm is not None:
        raise InvalidArgumentError("embedding_lookup_sparse: max_norm is not supported on a "
                                   "distributed table", table=t.remote.table)
    tf = _backend().framework_module()
    if not isinstance(sp_ids, tf.SparseTensor):
        raise InvalidArgumentError(
            f"embedding_lookup_sparse: sp_ids must be a tf.SparseTensor, got "
            f"{type(sp_ids).__name__}", table=t.remote.table)
    with tf.name_scope(name or "xdl_embedding_lookup_sparse"):
        bags = tf.shape(sp_ids, out_type=tf.int64)[0]
        rows = sp_ids.indices[:, 0]
        # offsets of each bag's first id, then len(ids): the bags of a ragged row layout
        splits = tf.searchsorted(rows, tf.range(bags + 1, dtype=tf.int64), side="left")
        weights = None if sp_weights is None else sp_weights.values
        return _backend().lookup_bags(t.remote, sp_ids.values, splits, combiner=combiner,
                                      per_sample_weights=weights, include_last_offset=True,
                                      anchor=t.anchor)


__all__ = ["embedding_lookup", "embedding_lookup_sparse", "table"]
