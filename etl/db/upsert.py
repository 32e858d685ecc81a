"""Set-based writes of parsed records. Never commits: the caller owns the transaction.

Orders go through ``COPY`` into a session-local staging table, then one guarded
``INSERT … SELECT … ON CONFLICT (order_id) DO UPDATE … WHERE``: a stored order is replaced only
by a newer ``last_update_time`` (at the coarser precision of the two), or an equal one with
different content that is not behind it (:func:`replaces_sql`), so a replay writes nothing
(no dead tuples) and an order never goes back. An account's first load, whose orders are not
stored yet, COPYs straight into ``orders`` instead (:func:`copy_new_orders`, about 30% less of
PostgreSQL's CPU) and turns to the merge at the first order it finds stored. Rejected payloads
are inserted into ``rejected_records``.

The parser screens every value against its column, so PostgreSQL should refuse nothing; as a
safety net, :func:`refusal_safe` writes a batch that failed on its data again one record at a time
(a savepoint each), so that only the records PostgreSQL refuses become rejected records.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import orjson
import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.db.engine import driver_cursor
from etl.db.models import rejected_records
from etl.kalshi.parse import (
    Order,
    QueuePosition,
    Rejected,
    escaped_text,
    storable_text,
    storage_problem,
)

log = logging.getLogger(__name__)

R = TypeVar("R")  # a parsed record: a dataclass with ``raw``

ORDER_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Order) if f.name != "line")
_STAGE = "kalshi_etl_orders_stage"
_STAGED = ("account", *ORDER_COLUMNS)  # the columns COPY fills: whose order, then the record
_UPDATABLE = [c for c in _STAGED if c != "order_id"]
_EPOCH = datetime.min.replace(tzinfo=UTC)


_CLOSED = "('executed', 'canceled')"


def _at(alias: str, *, new: str, old: str) -> str:
    """``alias``'s ``last_update_time`` at the coarser precision of ``new``'s and ``old``'s:
    whole seconds when either has no fraction of a second (REST's), else as stored."""
    whole = " OR ".join(
        f"date_trunc('second', {x}.last_update_time) = {x}.last_update_time" for x in (new, old)
    )
    time = f"{alias}.last_update_time"
    return f"(CASE WHEN {whole} THEN date_trunc('second', {time}) ELSE {time} END)"


def same_time_sql(new: str, old: str) -> str:
    """The SQL condition: versions ``new`` and ``old`` are as recent, at the coarser
    precision of the two (both without a time counts too)."""
    return f"{_at(new, new=new, old=old)} IS NOT DISTINCT FROM {_at(old, new=new, old=old)}"


def replaces_sql(new: str, old: str, *, stream: bool) -> str:
    """The SQL condition under which the version ``new`` (a table alias, or ``EXCLUDED``)
    replaces the stored version ``old`` of the same order: the one rule of the merge, which
    ``verify`` applies too, so that what it calls stale is what a repair rewrites.

    - Times compare at the coarser precision of the two: a REST ``last_update_time`` in whole
      seconds and a ``user_order`` stamped in milliseconds within that second are a tie.
    - The later time wins.
    - At a tie, an identical payload writes nothing; otherwise the version further along wins
      (more filled, or closed over resting: an order never goes back); at equal progress a
      REST version (``stream=False``) replaces, and a stream version replaces only a version
      that came from the stream too (its ``raw`` has ``created_ts_ms``): REST carries every
      field.
    """

    def progress(alias: str) -> str:
        return f"(coalesce({alias}.fill_count_fp, 0), {alias}.status IN {_CLOSED})"

    tie = f" AND {old}.raw ? 'created_ts_ms'" if stream else ""
    return f"""(
        ({old}.last_update_time IS NULL AND {new}.last_update_time IS NOT NULL)
        OR {_at(new, new=new, old=old)} > {_at(old, new=new, old=old)}
        OR ({same_time_sql(new, old)}
            AND {new}.raw IS DISTINCT FROM {old}.raw
            AND ({progress(new)} > {progress(old)}
                 OR ({progress(new)} = {progress(old)}{tie})))
    )"""


def _merge_sql(*, stream: bool, claim: bool = False) -> str:
    """The guarded merge of the staged rows (see :func:`replaces_sql` for which version
    wins). A stream version keeps every stored value the message did not carry: the fields
    the channel never sends (:data:`STREAM_LACKS`) and the optional ones a message may leave
    out (``subaccount_number``, ``order_group_id``, ``expiration_ts_ms``, ...).

    ``claim`` (a repair by ``verify``): a stored order of another account name is rewritten
    as this account's, whatever its version, so that a repair always converges.
    """
    assignments = ", ".join(
        f"{c} = COALESCE(EXCLUDED.{c}, o.{c})" if stream and c != "raw" else f"{c} = EXCLUDED.{c}"
        for c in _UPDATABLE
    )
    claimed = "OR o.account IS DISTINCT FROM EXCLUDED.account" if claim else ""
    return f"""
WITH merged AS (
    INSERT INTO orders AS o ({", ".join(_STAGED)}, first_synced_at, synced_at)
    SELECT {", ".join(_STAGED)}, %(at)s, %(at)s FROM {_STAGE} ORDER BY order_id COLLATE "C"
    ON CONFLICT (order_id) DO UPDATE SET {assignments}, synced_at = EXCLUDED.synced_at
    WHERE {replaces_sql("EXCLUDED", "o", stream=stream)} {claimed}
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM merged
"""


_MERGE_SQL = {
    (stream, claim): _merge_sql(stream=stream, claim=claim)
    for stream in (False, True)
    for claim in (False, True)
}


@dataclass(frozen=True)
class Counts:
    """What a write did: rows fetched, inserted, updated, left unchanged, rejected."""

    fetched: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Counts)))


def newest_per_order(records: Iterable[Order]) -> list[Order]:
    """One record per ``order_id``: the newest ``last_update_time`` (the later one on a tie).

    PostgreSQL refuses an ``ON CONFLICT`` statement that touches the same key twice.
    """
    newest: dict[str, Order] = {}
    for order in records:
        held = newest.get(order.order_id)
        if held is None or (order.last_update_time or _EPOCH) >= (held.last_update_time or _EPOCH):
            newest[order.order_id] = order
    return list(newest.values())


_COLUMNS_BUT_RAW = operator.attrgetter(*ORDER_COLUMNS[:-1])
_ORDER_ID = operator.attrgetter("order_id")


def _row(account: str, order: Order) -> tuple[Any, ...]:
    """The COPY row of an order the parser gave no line: the account, then its columns in
    ORDER_COLUMNS order, ``raw`` as JSON text."""
    return (account, *_COLUMNS_BUT_RAW(order), json_text(order.raw))


_COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def copy_cell(text: str) -> str:
    """``text`` as a cell of COPY's text format."""
    return text.translate(_COPY_ESCAPES)


def json_text(value: Any) -> str:
    """``value`` as JSON text: orjson's (fast), or the standard library's for what orjson
    does not write (integers past 64 bits, keys that are not strings)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _JSON.encode(value)


def _copy_orders(
    copy: psycopg.Copy, batch: Sequence[Order], account: str, *after: datetime
) -> None:
    """Write ``batch`` into ``copy``: each row is the account, the order's columns
    (ORDER_COLUMNS), then the values ``after``. The lines the parser made go as one write,
    the other orders row by row."""
    lines = [order.line for order in batch if order.line is not None]
    if lines:
        head = copy_cell(account) + "\t"
        tail = "".join("\t" + value.isoformat() for value in after)
        copy.write(head + (tail + "\n" + head).join(lines) + tail + "\n")
    for order in batch:
        if order.line is None:
            copy.write_row((*_row(account, order), *after))


def upsert_orders(
    conn: Connection,
    records: Sequence[Order],
    *,
    account: str,
    synced_at: datetime,
    from_stream: bool = False,
    claim: bool = False,
) -> Counts:
    """Write ``records`` (orders of ``account``) into ``orders``, newest version wins; return
    what happened. ``from_stream``: the records are ``user_order`` messages (see
    :func:`_merge_sql` for how they merge with REST versions); ``claim``: a repair, which
    also moves an order stored under another account name to ``account``.

    ``fetched`` counts every record given (duplicates included); ``unchanged`` is what the
    guard left alone, duplicates within the batch included.
    """
    if not records:
        return Counts()
    # Rows are locked in order_id order, whichever writer: the stream's micro-batches and a
    # REST page touching the same orders can then never deadlock.
    batch = newest_per_order(records)
    with driver_cursor(conn) as cur:
        cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} "
            f"(LIKE orders INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        cur.execute(f"TRUNCATE {_STAGE}")
        with cur.copy(f"COPY {_STAGE} ({', '.join(_STAGED)}) FROM STDIN") as copy:
            _copy_orders(copy, batch, account)
        cur.execute(_MERGE_SQL[from_stream, claim], {"at": synced_at})
        row = cur.fetchone()
    assert row is not None
    inserted, updated = int(row[0]), int(row[1])
    return Counts(
        fetched=len(records),
        inserted=inserted,
        updated=updated,
        unchanged=len(records) - inserted - updated,
    )


_NEW_ORDERS_COPY: Final = (
    f"COPY orders ({', '.join(_STAGED)}, first_synced_at, synced_at) FROM STDIN"
)


def copy_new_orders(
    conn: Connection, records: Sequence[Order], *, account: str, synced_at: datetime
) -> Counts | None:
    """Write ``records`` straight into ``orders`` with one ``COPY``, no staging and no merge:
    the fast path of a first load, whose orders are not stored yet. When one of them is
    stored already (an order listed twice, or written meanwhile by the stream), nothing is
    written and ``None`` returned: the caller merges them instead (:func:`upsert_orders`).
    """
    if not records:
        return Counts()
    # Rows are locked in the merge's order (order_id, byte by byte, as Python compares).
    batch = sorted(newest_per_order(records), key=_ORDER_ID)
    try:
        with conn.begin_nested(), driver_cursor(conn) as cur:
            with cur.copy(_NEW_ORDERS_COPY) as copy:
                _copy_orders(copy, batch, account, synced_at, synced_at)
    except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected):
        return None
    return Counts(fetched=len(records), inserted=len(batch), unchanged=len(records) - len(batch))


def insert_rejected(
    conn: Connection,
    rejected: Sequence[Rejected],
    *,
    stream: str,
    account: str | None,
    received_at: datetime,
    skip_known: bool = False,
) -> int:
    """Keep rejected payloads with their reasons; return how many rows were written. A
    payload already kept for ``stream`` is not written again (the first reason stays).

    A payload ``jsonb`` cannot hold is kept as escaped text. With ``skip_known``, a rejection
    whose stream and reason are already recorded is not written again (a failure that repeats
    every cycle is recorded once).
    """
    rows = [
        {
            "account": account,
            "stream": stream,
            "received_at": received_at,
            "error": storable_text(item.reason),
            **rejected_payload(item.raw),
        }
        for item in rejected
    ]
    if skip_known and rows:
        known = set(
            conn.execute(
                sa.select(rejected_records.c.error).where(
                    rejected_records.c.stream == stream,
                    rejected_records.c.error.in_([row["error"] for row in rows]),
                )
            ).scalars()
        )
        rows = [row for row in rows if row["error"] not in known]
    if not rows:
        return 0
    result = conn.execute(
        _REJECTED_SQL,
        {
            "account": account,
            "stream": stream,
            "received_at": received_at,
            "errors": [row["error"] for row in rows],
            "payloads": [
                None if row["payload"] is None else json_text(row["payload"]) for row in rows
            ],
            "texts": [row["payload_text"] for row in rows],
        },
    )
    return int(result.rowcount)


# A payload already kept for the stream (the same jsonb, or the same text) writes nothing: a
# record the API keeps serving is kept once, not once per cycle.
_REJECTED_SQL = sa.text(
    """
    INSERT INTO rejected_records
        (account, stream, received_at, error, payload, payload_text, payload_md5)
    SELECT :account, :stream, :received_at, u.error, u.payload, u.payload_text,
           md5(coalesce(u.payload::text, '') || chr(31) || coalesce(u.payload_text, ''))
    FROM unnest(CAST(:errors AS text[]), CAST(CAST(:payloads AS text[]) AS jsonb[]),
                CAST(:texts AS text[])) AS u(error, payload, payload_text)
    ON CONFLICT (stream, payload_md5) DO NOTHING
    """
)


def rejected_payload(raw: Any) -> dict[str, Any]:
    """The ``payload``/``payload_text`` columns of a rejected record."""
    if isinstance(raw, str):
        return {"payload": None, "payload_text": storable_text(raw)}
    if storage_problem(raw) is not None:
        return {"payload": None, "payload_text": escaped_text(raw)}
    return {"payload": raw, "payload_text": None}


def is_record_error(exc: BaseException) -> bool:
    """True when a write failed because of the values it carried (out of range, not
    encodable, too large for an index), not because of the database or the connection."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    return isinstance(
        orig,
        psycopg.errors.DataError
        | psycopg.errors.IntegrityError
        | psycopg.errors.ProgramLimitExceeded
        | UnicodeError
        | ValueError
        | OverflowError
        | RecursionError,
    )


def write_records(
    conn: Connection,
    records: Sequence[R],
    write: Callable[[Connection, Sequence[R]], Counts],
    *,
    one_by_one: bool,
) -> tuple[Counts, list[Rejected]]:
    """Write ``records`` with ``write``: all at once, or, ``one_by_one``, each in a savepoint,
    the ones PostgreSQL refuses coming back as :class:`Rejected` (payload as escaped text)."""
    if not one_by_one:
        return write(conn, records), []
    counts = Counts()
    refused: list[Rejected] = []
    for record in records:
        try:
            with conn.begin_nested():
                counts += write(conn, [record])
        except Exception as exc:
            if not is_record_error(exc):
                raise
            orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
            detail = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
            reason = f"PostgreSQL refused it: {type(orig).__name__}: {detail}"
            log.warning("%s: %s", _label(record), reason)
            refused.append(Rejected(reason, escaped_text(getattr(record, "raw", None))))
    return counts, refused


def _label(record: object) -> str:
    """``order 0001…`` / ``fill f-1`` / ``record``: what a log line calls a record."""
    for kind in ("order", "fill"):
        value = getattr(record, f"{kind}_id", None)
        if value:
            return f"{kind} {value}"
    ticker = getattr(record, "ticker", None)
    return f"record of {ticker}" if ticker else "record"


T = TypeVar("T")


def refusal_safe(attempt: Callable[[bool], T], *, what: str) -> T:
    """``attempt(False)``; when PostgreSQL refuses it on its data, ``attempt(True)``: the
    same write one record at a time, so that only the refused records are set aside."""
    try:
        return attempt(False)
    except Exception as exc:
        if not is_record_error(exc):
            raise
        log.warning("PostgreSQL refused %s (%s); writing it record by record", what, exc)
    return attempt(True)


_SNAPSHOT_SQL = sa.text(
    """
    INSERT INTO queue_position_snapshots
        (order_id, account, market_ticker, queue_position, captured_at)
    SELECT n.order_id, :account, n.market_ticker, n.queue_position, :captured_at
    FROM unnest(CAST(:order_ids AS text[]), CAST(:tickers AS text[]),
                CAST(:positions AS numeric[])) AS n(order_id, market_ticker, queue_position)
    LEFT JOIN LATERAL (
        SELECT s.queue_position FROM queue_position_snapshots s
        WHERE s.order_id = n.order_id ORDER BY s.captured_at DESC LIMIT 1
    ) AS latest ON true
    WHERE latest.queue_position IS DISTINCT FROM n.queue_position
    ON CONFLICT DO NOTHING
    """
)


def insert_snapshots(
    conn: Connection, positions: Sequence[QueuePosition], *, account: str, captured_at: datetime
) -> Counts:
    """Write a snapshot (of an order of ``account``) for each position first seen or different
    from its latest row."""
    if not positions:
        return Counts()
    latest = {p.order_id: p for p in positions}
    result = conn.execute(
        _SNAPSHOT_SQL,
        {
            "captured_at": captured_at,
            "account": account,
            "order_ids": list(latest),
            "tickers": [p.market_ticker for p in latest.values()],
            "positions": [p.queue_position for p in latest.values()],
        },
    )
    inserted = result.rowcount
    return Counts(fetched=len(positions), inserted=inserted, unchanged=len(positions) - inserted)


_CLOSE_SQL = sa.text(
    """
    INSERT INTO queue_position_snapshots
        (order_id, account, market_ticker, queue_position, captured_at)
    SELECT latest.order_id, :account, latest.market_ticker, NULL, :captured_at
    FROM (
        SELECT DISTINCT ON (s.order_id) s.order_id, s.market_ticker, s.queue_position
        FROM queue_position_snapshots s
        JOIN orders o ON o.order_id = s.order_id
        WHERE o.account = :account AND s.account = :account
          AND o.status NOT IN ('resting', 'pending')
          AND (CAST(:since AS timestamptz) IS NULL OR o.synced_at >= CAST(:since AS timestamptz))
        ORDER BY s.order_id, s.captured_at DESC
    ) AS latest
    WHERE latest.queue_position IS NOT NULL
    ON CONFLICT DO NOTHING
    """
)


def close_snapshots(
    conn: Connection, *, account: str, captured_at: datetime, changed_since: datetime | None
) -> int:
    """Write the closing row (``queue_position`` NULL) of each order of ``account`` that is no
    longer open but whose latest snapshot still holds a position; only orders written since
    ``changed_since`` are looked at (all when ``None``). Returns the rows written."""
    result = conn.execute(
        _CLOSE_SQL, {"captured_at": captured_at, "account": account, "since": changed_since}
    )
    return result.rowcount
