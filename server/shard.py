"""One parameter-server shard, independent of the transport: state plus dispatcher.

A shard serves requests one at a time (the numba kernels do the heavy work), so
every command sees a consistent state and a checkpoint is a snapshot. Where each
part lives:

- :mod:`xdl.server.state`: what a shard holds (tables, dense variables, waiting pulls);
- :mod:`xdl.server.dispatch`: decoding, size check, routing, the catch-all;
- :mod:`xdl.server.exactly_once`: per-client high-water marks and remembered outcomes;
- handlers by subject: :mod:`xdl.server.kv` (``PULL``/``PUSH``/``DELETE``),
  :mod:`xdl.server.table_commands`, :mod:`xdl.server.dense`, :mod:`xdl.server.admin`;
- :mod:`xdl.server.service`: the ZeroMQ loop; :mod:`xdl.server.main`: the command line.
"""

from __future__ import annotations

from typing import Any

from . import admin, dense, kv, table_commands
from .dispatch import Dispatcher, Handler
from .state import Respond, ShardState

#: command → handler, every command of the protocol exactly once
HANDLERS: dict[bytes, Handler] = {
    **table_commands.HANDLERS, **kv.HANDLERS, **dense.HANDLERS, **admin.HANDLERS}


class Shard(ShardState):
    """A shard's state with its dispatcher: call :meth:`handle` with each request.

    Takes :class:`~xdl.server.state.ShardState`'s parameters.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dispatcher = Dispatcher(self, HANDLERS)

    def handle(self, frames: list[Any], respond: Respond) -> None:
        """Serve one request (its frames without the routing identity).

        ``respond`` sends reply frames; it may be kept and called later (a parked
        synchronous dense pull). Never raises: every failure becomes an error reply.
        """
        self.dispatcher.handle(frames, respond)
