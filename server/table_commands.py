"""Handlers of the commands that manage sparse tables: create, describe, list, drop."""

from __future__ import annotations

from xdl import init as xinit
from xdl import optim as xoptim
from xdl import protocol as P
from xdl.errors import TableExistsError

from .fields import int_field, name_field, spec_field
from .state import Reply, Request, ShardState
from .table import SparseTable

#: Widest row a table may have.
MAX_TABLE_DIM = 65536


def create_table(state: ShardState, req: Request) -> Reply:
    """Create a table, or confirm one with the same settings exists (``created`` False)."""
    h = req.header
    name = name_field(h, "table", "table")
    dim = int_field(h, "dim", 1, MAX_TABLE_DIM, table=name)
    seed = int_field(h, "seed", -(1 << 63), (1 << 64) - 1, default=0, table=name)
    initializer = xinit.from_dict(spec_field(h, "initializer", {"kind": "zeros"}, name))
    optimizer = xoptim.from_dict(spec_field(h, "optimizer", {"kind": "sgd", "lr": 0.01}, name))
    want = SparseTable(name, dim, initializer, optimizer, seed=seed, capacity=1)
    existing = state.tables.get(name)
    if existing is not None:
        if existing.spec_dict() != want.spec_dict():
            raise TableExistsError(
                f"table exists with other settings: existing {existing.spec_dict()}, "
                f"requested {want.spec_dict()}", table=name)
        return {"created": False}, {}
    state.tables[name] = SparseTable(name, dim, initializer, optimizer, seed=seed)
    return {"created": True}, {}


def describe_table(state: ShardState, req: Request) -> Reply:
    """Settings and sizes of one table."""
    return {"table": state.table(req.header.get("table")).describe()}, {}


def list_tables(state: ShardState, req: Request) -> Reply:
    """Names of every table and dense variable."""
    return {"tables": sorted(state.tables), "dense": sorted(state.dense)}, {}


def drop_table(state: ShardState, req: Request) -> Reply:
    """Drop a table or a dense variable (waiting pulls of it are answered with an error)."""
    name = req.header.get("table")
    if isinstance(name, str) and name in state.dense:
        del state.dense[name]
        state.sync.pop(name, None)
        state.refuse_parked("its dense variable was dropped", name)
        return {"dropped": True}, {}
    state.table(name)
    del state.tables[name]  # type: ignore[arg-type]
    return {"dropped": True}, {}


HANDLERS = {P.CREATE_TABLE: create_table, P.DESCRIBE_TABLE: describe_table,
            P.LIST_TABLES: list_tables, P.DROP_TABLE: drop_table}
