"""The write rules of the account's streams, as values the engine applies: which version of a
record a table keeps. Never commits: the caller owns the transaction.

- :class:`InsertOnce` (``fills``): a record never changes, so a replay writes nothing; a
  version the WebSocket sent (its payload has ``stream_marker``) is replaced by the REST
  version, which carries every field; a repair (``claim``) writes the API's version whatever.
- :class:`NewestWins` (``settlements``, cash): the stored version is replaced by one whose
  ``version`` column is newer, or as new with different content (``version`` ``None``: the
  last version fetched wins whenever its content differs).
- :class:`ChangeOnly` (positions, balance): a snapshot series; a row is added, stamped
  ``captured_at``, when its series has none yet or its latest row differs in the compared
  columns (:func:`write_snapshots`); after a complete listing, a series no longer listed gets
  one closing row (:func:`close_unlisted`).

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
    marks: bool = False  # mark the markets written for a rebuild of their lots (pnl_marks)

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
    marks: bool = False  # mark the markets written for a rebuild of their lots (pnl_marks)

    def guard(self, new: str, old: str, *, claim: bool) -> str:
        different = f"{new}.raw IS DISTINCT FROM {old}.raw"
        if self.version is None or claim:
            return different
        v = self.version
        return (
            f"{new}.{v} > {old}.{v} OR ({old}.{v} IS NULL AND {new}.{v} IS NOT NULL) "
            f"OR ({new}.{v} IS NOT DISTINCT FROM {old}.{v} AND {different})"
        )


@dataclass(frozen=True)
class ChangeOnly:
    """A snapshot series per ``series`` (``account`` first, ``captured_at`` excluded): a row
    when the latest one differs in ``compared``. ``closed``: the values of the row a series
    gets when a complete listing no longer lists it (``None``: never closed)."""

    table: sa.Table
    series: tuple[str, ...]
    compared: tuple[str, ...]
    closed: tuple[tuple[str, Any], ...] | None = None

    @property
    def key(self) -> tuple[str, ...]:
        return (*self.series, "captured_at")


WriteRule = InsertOnce | NewestWins | ChangeOnly


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
    if isinstance(rule, ChangeOnly):
        return write_snapshots(conn, rule, rows, captured_at=synced_at)
    columns, last = _last_per_key(rows, rule.key)
    with driver_cursor(conn) as cur:
        _stage(cur, rule.table.name, columns, last)
        cur.execute(_merge_sql(rule, columns, claim=claim), {"at": synced_at})
        inserted, updated = (int(n) for n in cur.fetchone() or (0, 0))
    return Counts(
        fetched=len(rows),
        inserted=inserted,
        updated=updated,
        unchanged=len(rows) - inserted - updated,
    )


def write_snapshots(
    conn: Connection,
    rule: ChangeOnly,
    rows: Sequence[dict[str, Any]],
    *,
    captured_at: datetime,
    compared: Sequence[str] | None = None,
) -> Counts:
    """Add a row stamped ``captured_at`` (or the row's own ``captured_at``) for each series of
    ``rows`` whose latest row differs in ``compared`` (default: the rule's), or that has none.
    A column a row holds as ``None`` and ``compared`` leaves out keeps the latest row's value
    (a source that carries only some fields). Several rows of one series: the last one."""
    if not rows:
        return Counts()
    stamped = [{"captured_at": captured_at, **row} for row in rows]
    columns, last = _last_per_key(stamped, rule.series)
    table, stage = rule.table.name, _stage_name(rule.table.name)
    compared = list(rule.compared if compared is None else compared)
    kept = [c for c in columns if c not in rule.series and c != "captured_at"]

    def value(c: str) -> str:
        if c in rule.series or c == "captured_at" or c in compared or c == "raw":
            return f"s.{c}"
        return f"COALESCE(s.{c}, l.{c})"

    series = ", ".join(rule.series)
    joined = " AND ".join(f"l.{c} = s.{c}" for c in rule.series)
    new = ", ".join(f"s.{c}" for c in compared)
    old = ", ".join(f"l.{c}" for c in compared)
    sql = f"""
        WITH latest AS (
            SELECT DISTINCT ON ({series}) t.*
            FROM {table} t JOIN (SELECT DISTINCT {series} FROM {stage}) k USING ({series})
            ORDER BY {series}, t.captured_at DESC
        ), written AS (
            INSERT INTO {table} ({", ".join([*rule.series, "captured_at", *kept])})
            SELECT {", ".join(value(c) for c in [*rule.series, "captured_at", *kept])}
            FROM {stage} s LEFT JOIN latest l ON {joined}
            WHERE l.captured_at IS NULL OR ROW({new}) IS DISTINCT FROM ROW({old})
            ORDER BY {", ".join(f"s.{c}" for c in rule.series)}
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        SELECT count(*) FROM written
    """
    with driver_cursor(conn) as cur:
        _stage(cur, table, columns, last)
        cur.execute(sql)
        inserted = int((cur.fetchone() or (0,))[0])
    return Counts(fetched=len(rows), inserted=inserted, unchanged=len(rows) - inserted)


def close_unlisted(
    conn: Connection,
    rule: ChangeOnly,
    where: dict[str, Any],
    listed: Sequence[tuple[Any, ...]],
    *,
    captured_at: datetime,
) -> int:
    """After a complete listing of the series matching ``where`` (``account``, a subaccount),
    give each of those whose latest row is not closed yet and whose key (its series columns
    that ``where`` leaves out, in order) ``listed`` lacks one closing row: ``rule.closed``'s
    values, the other columns kept, ``raw`` saying why. Returns the rows added."""
    assert rule.closed is not None
    closed = dict(rule.closed)
    series = ", ".join(rule.series)
    free = [c for c in rule.series if c not in where]
    filters = " AND ".join(f"{c} = %(where_{c})s" for c in where)
    others = [c for c in rule.table.c.keys() if c not in rule.series and c != "captured_at"]

    def value(c: str) -> str:
        if c in closed:
            return f"%(closed_{c})s"
        return "%(why)s::jsonb" if c == "raw" else f"l.{c}"

    differs = " OR ".join(f"l.{c} IS DISTINCT FROM %(closed_{c})s" for c in closed)
    arrays = ", ".join(f"%(listed_{i})s::text[]" for i in range(len(free)))
    names = ", ".join(f"u{i}" for i in range(len(free)))
    same = " AND ".join(f"l.{c}::text = u.u{i}" for i, c in enumerate(free))
    sql = f"""
        WITH latest AS (
            SELECT DISTINCT ON ({series}) *
            FROM {rule.table.name} WHERE {filters}
            ORDER BY {series}, captured_at DESC
        ), written AS (
            INSERT INTO {rule.table.name} ({series}, captured_at, {", ".join(others)})
            SELECT {", ".join(f"l.{c}" for c in rule.series)}, %(at)s,
                   {", ".join(value(c) for c in others)}
            FROM latest l
            WHERE ({differs})
              AND NOT EXISTS (SELECT 1 FROM unnest({arrays}) AS u({names}) WHERE {same})
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        SELECT count(*) FROM written
    """
    params: dict[str, Any] = {
        **{f"where_{c}": v for c, v in where.items()},
        **{f"closed_{c}": v for c, v in closed.items()},
        **{f"listed_{i}": [str(key[i]) for key in listed] for i in range(len(free))},
        "at": captured_at,
        "why": '{"no_longer_listed": true}',
    }
    with driver_cursor(conn) as cur:
        cur.execute(sql, params)
        return int((cur.fetchone() or (0,))[0])


def _last_per_key(
    rows: Sequence[dict[str, Any]], key: Sequence[str]
) -> tuple[list[str], dict[tuple[Any, ...], dict[str, Any]]]:
    """The columns of ``rows`` and, per key, the last row (a statement may touch a row once)."""
    last: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        last[tuple(row[k] for k in key)] = row
    return list(next(iter(last.values()))), last


def _stage_name(table: str) -> str:
    return f"kalshi_etl_{table}_stage"


def _stage(
    cur: Any, table: str, columns: Sequence[str], rows: dict[tuple[Any, ...], dict[str, Any]]
) -> None:
    """``rows`` COPYed into ``table``'s session-local staging table (emptied first)."""
    stage = _stage_name(table)
    cur.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} "
        f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    cur.execute(f"TRUNCATE {stage}")
    with cur.copy(f"COPY {stage} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows.values():
            copy.write_row([_cell(row[c]) for c in columns])


def _cell(value: Any) -> Any:
    """A value as COPY takes it: JSON documents (``raw``) as their text."""
    return json_text(value) if isinstance(value, dict | list) else value


def _merge_sql(rule: InsertOnce | NewestWins, columns: Sequence[str], *, claim: bool) -> str:
    table = rule.table.name
    stage = _stage_name(table)
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
            RETURNING (xmax = 0) AS inserted{_MARKED_KEYS if rule.marks else ""}
        ){_MARK if rule.marks else ""}
        SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
        FROM written
    """


_MARKED_KEYS = ", account, subaccount_number, ticker"
# The markets of the rows written, marked for a rebuild of their lots in the same statement
# (a mark that exists gets a new version: a rebuild running meanwhile keeps it).
_MARK = """, marked AS (
            INSERT INTO pnl_marks (account, subaccount_number, ticker)
            SELECT DISTINCT account, subaccount_number, ticker FROM written
            ORDER BY 1, 2, 3
            ON CONFLICT (account, subaccount_number, ticker)
            DO UPDATE SET version = nextval('pnl_mark_seq')
        )"""
