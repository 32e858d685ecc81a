"""The account's streams, as data: a stream is a :class:`Listing` — its endpoint(s), how its
records parse, which columns they fill and which version its table keeps — and the engine
(:mod:`etl.sync.listing`) runs every one of them the same way. No loops, no I/O here.

Orders and queue positions, whose cycles also settle open orders and close queue series, run
on the same engine through their own modules (:mod:`etl.sync.orders`, :mod:`etl.sync.queue`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from etl.db.write import WriteRule


@dataclass(frozen=True)
class Listing:
    """One stream read from a cursor listing.

    Attributes:
        name: the stream's name (``sync_state``, ``sync_runs``, ``rejected_records``, metrics).
        path: the live listing (``portfolio/fills``), under the API root.
        items_key: the list's key in a page (``fills``); ``None``: the endpoint answers one
            object, which is the record (``portfolio/balance``).
        parse: one item → a record with ``columns`` as attributes, or a ``Rejected``; called
            as ``parse(item, screened=...)`` (and ``subaccount=n`` when ``per_subaccount``).
        columns: the table columns a record fills (``account`` and the sync times aside).
        rule: which version the table keeps (:mod:`etl.db.write`).
        every: the daemon's default interval.
        noun: what the records are called in logs.
        historical_path: the historical tier's listing, where there is one.
        cutoff_field: the field of ``GET /historical/cutoff`` before which records are served
            only by ``historical_path``.
        per_subaccount: list once per subaccount and stamp its number on each record (the
            records carry none).
        incremental: after the first run, ask only for records since the watermark less the
            lookback (``min_ts``); otherwise every run reads the whole listing.
        forgotten: the API stops listing records that stay true (an archived settlement):
            a stored record no longer listed is kept, and ``verify`` never calls it extra.
        filters: query parameters sent with every request (``settlement_status=all``).
        also: listings read in the same run, after this one (the other kinds of cash
            movements; archived positions, into their own table).
        verified: ``verify`` compares its listing with its table.
    """

    name: str
    path: str
    items_key: str | None
    parse: Callable[..., Any]
    columns: tuple[str, ...]
    rule: WriteRule
    every: timedelta
    noun: str
    historical_path: str | None = None
    cutoff_field: str | None = None
    per_subaccount: bool = False
    incremental: bool = True
    forgotten: bool = False
    filters: tuple[tuple[str, str], ...] = ()
    also: tuple[Listing, ...] = field(default=())
    verified: bool = True

    @property
    def listings(self) -> tuple[Listing, ...]:
        """This listing and those read with it, in order."""
        return (self, *self.also)
