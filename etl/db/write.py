"""The write rules of the account's streams, as values the engine applies: which version of a
record a table keeps. Never commits: the caller owns the transaction.

- :class:`InsertOnce` (``fills``): a record never changes, so a replay writes nothing; a
  version the WebSocket sent (its payload has ``stream_marker``) is replaced by the REST
  version, which carries every field; a repair (``claim``) writes the API's version whatever.
- :class:`NewestWins` (``settlements``, cash): the stored version is replaced by one whose
  ``version`` column is newer, or as new with different content (``version`` ``None``: the
  last version fetched wins whenever its content differs).

Each write is one ``INSERT … ON CONFLICT (key) DO UPDATE … WHERE <rule>``: rows the rule
leaves alone are not touched (no dead tuples), and ``RETURNING (xmax = 0)`` tells inserted
from updated. Orders keep their own COPY-and-merge path (:mod:`etl.db.upsert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from etl.db.upsert import Counts


@dataclass(frozen=True)
class InsertOnce:
    """Keep the first version of a record; only a stream's version gives way to REST's."""

    table: sa.Table
    key: tuple[str, ...]
    stream_marker: str | None = None  # a key only the WebSocket's payloads have

    def guard(self, new: str, old: str, *, claim: bool) -> str:
        if claim:
            return f"{new}.raw IS DISTINCT FROM {old}.raw OR {new}.account <> {old}.account"
        if self.stream_marker is None:
            return "false"
        marker = self.stream_marker
        return f"{old}.raw ? '{marker}' AND NOT {new}.raw ? '{marker}'"


@dataclass(frozen=True)
class NewestWins:
    """Keep the newest version: by ``version`` (a timestamp column), the later one; as new,
    the one fetched last when its content differs."""

    table: sa.Table
    key: tuple[str, ...]
    version: str | None = None

    def guard(self, new: str, old: str, *, claim: bool) -> str:
        different = f"{new}.raw IS DISTINCT FROM {old}.raw"
        if self.version is None or claim:
            return different
        v = self.version
        return (
            f"{new}.{v} > {old}.{v} OR ({old}.{v} IS NULL AND {new}.{v} IS NOT NULL) "
            f"OR ({new}.{v} IS NOT DISTINCT FROM {old}.{v} AND {different})"
        )


WriteRule = InsertOnce | NewestWins


def write_rows(
    conn: Connection,
    rule: WriteRule,
    rows: Sequence[dict[str, Any]],
    *,
    synced_at: datetime,
    claim: bool = False,
) -> Counts:
    """Write ``rows`` (column → value, ``account`` and ``raw`` included) by ``rule``; return
    what happened. Rows with the same key in one batch: the last one counts (PostgreSQL
    refuses a statement that touches one row twice), the others are unchanged."""
    if not rows:
        return Counts()
    last: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        last[tuple(row[k] for k in rule.key)] = row
    table = rule.table
    values = [
        {**row, "first_synced_at": synced_at, "synced_at": synced_at} for row in last.values()
    ]
    stmt = pg_insert(table).values(values)
    updatable = [c for c in values[0] if c not in rule.key and c != "first_synced_at"]
    upsert: Any = stmt.on_conflict_do_update(
        index_elements=[table.c[k] for k in rule.key],
        set_={c: stmt.excluded[c] for c in updatable},
        where=sa.text(rule.guard("excluded", table.name, claim=claim)),
    ).returning(sa.literal_column("(xmax = 0)").label("inserted"))
    flags = [bool(inserted) for (inserted,) in conn.execute(upsert)]
    inserted = sum(flags)
    updated = len(flags) - inserted
    return Counts(
        fetched=len(rows), inserted=inserted, updated=updated, unchanged=len(rows) - len(flags)
    )
