"""The write rules of the account's streams, as values the engine applies: which version of a
record a table keeps. Never commits: the caller owns the transaction.

- :class:`InsertOnce` (``fills``): a record never changes, so a replay writes nothing; a
  version the WebSocket sent (its payload has ``stream_marker``) is replaced by the REST
  version, which carries every field; a repair (``claim``) writes the API's version whatever.
- :class:`NewestWins` (``settlements``, cash): the stored version is replaced by one whose
  ``version`` column is newer, or as new with different content (``version`` ``None``: the
  last version fetched wins whenever its content differs).

Each write is a ``COPY`` into a staging table, then one ``INSERT … SELECT … ON CONFLICT (key)
DO UPDATE … WHERE <rule>``: rows the rule leaves alone are not touched (no dead tuples), and
``RETURNING (xmax = 0)`` tells inserted from updated. Orders keep their own merge, whose rule
compares versions field by field (:mod:`etl.db.upsert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.db.engine import driver_cursor
from etl.db.upsert import Counts, json_text


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
    refuses a statement that touches one row twice), the others are unchanged.

    The rows go by ``COPY`` into a session-local staging table, then one ``INSERT … SELECT …
    ON CONFLICT`` in key order (so that two writers never lock rows in opposite orders)."""
    if not rows:
        return Counts()
    last: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        last[tuple(row[k] for k in rule.key)] = row
    table = rule.table.name
    columns = list(next(iter(last.values())))
    stage = f"kalshi_etl_{table}_stage"
    with driver_cursor(conn) as cur:
        cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
            f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        cur.execute(f"TRUNCATE {stage}")
        with cur.copy(f"COPY {stage} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in last.values():
                copy.write_row([_cell(row[c]) for c in columns])
        cur.execute(_merge_sql(rule, columns, claim=claim), {"at": synced_at})
        inserted, updated = (int(n) for n in cur.fetchone() or (0, 0))
    return Counts(
        fetched=len(rows),
        inserted=inserted,
        updated=updated,
        unchanged=len(rows) - inserted - updated,
    )


def _cell(value: Any) -> Any:
    """A value as COPY takes it: JSON documents (``raw``) as their text."""
    return json_text(value) if isinstance(value, dict | list) else value


def _merge_sql(rule: WriteRule, columns: Sequence[str], *, claim: bool) -> str:
    table = rule.table.name
    stage = f"kalshi_etl_{table}_stage"
    names = ", ".join(columns)
    updatable = [c for c in columns if c not in rule.key]
    assignments = ", ".join(f"{c} = excluded.{c}" for c in [*updatable, "synced_at"])
    return f"""
        WITH written AS (
            INSERT INTO {table} ({names}, first_synced_at, synced_at)
            SELECT {names}, %(at)s, %(at)s FROM {stage}
            ORDER BY {", ".join(rule.key)}
            ON CONFLICT ({", ".join(rule.key)}) DO UPDATE SET {assignments}
            WHERE {rule.guard("excluded", table, claim=claim)}
            RETURNING (xmax = 0) AS inserted
        )
        SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
        FROM written
    """
