"""The exactly-once filter: per client, the highest applied seq and remembered outcomes.

Every mutating request carries ``(cid, inc, seq)``. A seq above the client's
high-water mark is new: it runs, and its outcome is remembered. A seq at or below the
mark is a resend and does not run again; it gets the outcome it had:

- the mark itself: the stored reply, word for word (flag ``dup``);
- a refused seq within the last :data:`REFUSED_WINDOW` refusals: the same error
  (flag ``dup``), so a refused push stays refused however often it is resent;
- any other seq at or below the mark: it was applied, so ``ok`` (flag ``dup``);
- a seq no older than a refusal that has since left the window: its outcome is no
  longer known, and the reply says so (``STALE_CLIENT``) rather than guess.

The records (incarnation, mark, remembered refusals) are part of a checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from xdl import codec
from xdl.errors import StaleClientError

#: Refusals remembered per client (older ones are forgotten, see the module docs).
REFUSED_WINDOW = 1024


@dataclass
class ClientRecord:
    """Exactly-once state of one client.

    :param incarnation: the client's incarnation this record belongs to.
    :param hwm: highest seq applied or refused.
    :param reply: the reply frames sent for ``hwm``.
    :param refused: seq → ``(code, message, table)`` of the latest refusals.
    :param forgotten: highest refused seq dropped from ``refused``.
    """

    incarnation: int
    hwm: int = -1
    reply: list[Any] = field(default_factory=list)
    refused: OrderedDict[int, tuple[str, str, str | None]] = field(default_factory=OrderedDict)
    forgotten: int = -1

    def to_json(self) -> list[Any]:
        """``[incarnation, hwm, [[seq, code, message, table], ...], forgotten]``."""
        return [self.incarnation, self.hwm,
                [[s, c, m, t] for s, (c, m, t) in self.refused.items()], self.forgotten]

    @classmethod
    def from_json(cls, data: Any) -> ClientRecord:
        """Rebuild from :meth:`to_json` (or the older ``[incarnation, hwm]``).

        :raises ValueError: when ``data`` does not have that form.
        """
        if not isinstance(data, list) or len(data) not in (2, 4) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in data[:2]):
            raise ValueError(f"bad client record {data!r}")
        rec = cls(incarnation=data[0], hwm=data[1])
        if len(data) == 4:
            refused, forgotten = data[2], data[3]
            if not isinstance(refused, list) or not isinstance(forgotten, int):
                raise ValueError(f"bad client record {data!r}")
            for entry in refused:
                if (not isinstance(entry, list) or len(entry) != 4
                        or not isinstance(entry[0], int) or not isinstance(entry[1], str)
                        or not isinstance(entry[2], str)
                        or not (entry[3] is None or isinstance(entry[3], str))):
                    raise ValueError(f"bad refused entry {entry!r}")
                rec.refused[entry[0]] = (entry[1], entry[2], entry[3])
            rec.forgotten = forgotten
        else:
            # Outcomes at or below a mark read from an old checkpoint are not known.
            rec.forgotten = rec.hwm
        return rec

    def newer(self, other: ClientRecord) -> bool:
        """Whether this record is ahead of ``other`` (merging checkpoint parts)."""
        return (self.incarnation, self.hwm) > (other.incarnation, other.hwm)


class ExactlyOnce:
    """Per-client high-water marks and remembered outcomes (see the module docs)."""

    def __init__(self) -> None:
        self.records: dict[str, ClientRecord] = {}

    def record(self, cid: str, inc: int) -> ClientRecord:
        """The record of ``cid`` for incarnation ``inc`` (a newer incarnation starts afresh).

        :raises StaleClientError: ``inc`` is older than one already served.
        """
        rec = self.records.get(cid)
        if rec is None or inc > rec.incarnation:
            rec = ClientRecord(incarnation=inc)
            self.records[cid] = rec
        elif inc < rec.incarnation:
            raise StaleClientError(
                f"client {cid} incarnation {inc} is older than {rec.incarnation}, which this "
                "shard has already served; a restarted client must use a new incarnation")
        return rec

    def resend_reply(self, cid: str, rec: ClientRecord, command: bytes, seq: int
                     ) -> list[Any] | None:
        """The reply to a resend of ``seq``, or ``None`` when ``seq`` is new."""
        if seq > rec.hwm:
            return None
        if seq == rec.hwm and rec.reply:
            _, h, arrays = codec.decode(rec.reply)
            h.pop("arrays", None)
            h["dup"] = True
            return codec.encode(command, h, arrays)
        refusal = rec.refused.get(seq)
        if refusal is not None:
            code, message, table = refusal
            return codec.encode(command, {"ok": False, "seq": seq, "dup": True, "code": code,
                                          "message": message, "table": table})
        if seq <= rec.forgotten:
            return codec.encode(command, {
                "ok": False, "seq": seq, "dup": True, "code": StaleClientError.code,
                "message": f"seq {seq} of client {cid} is too old: this shard no "
                           "longer knows whether it was applied or refused (it keeps the "
                           f"last {REFUSED_WINDOW} refusals); read the state before "
                           "retrying", "table": None})
        return codec.encode(command, {"ok": True, "seq": seq, "dup": True})

    def remember(self, rec: ClientRecord, seq: int, reply: list[Any],
                 refusal: tuple[str, str, str | None] | None) -> None:
        """Record the outcome of a new ``seq``: its reply, and the error if refused."""
        rec.hwm = seq
        rec.reply = reply
        if refusal is not None:
            rec.refused[seq] = refusal
            while len(rec.refused) > REFUSED_WINDOW:
                old, _ = rec.refused.popitem(last=False)
                rec.forgotten = max(rec.forgotten, old)
