"""Sync state: watermarks (``sync_state``) and run history (``sync_runs``).

Every function runs in the caller's transaction, so a watermark lands atomically with the rows
it covers. A watermark never moves backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from etl.db.models import orders, sync_runs, sync_state
from etl.db.upsert import Counts
from etl.kalshi.parse import storable_text

Mode = Literal["incremental", "backfill", "reconcile"]
RunStatus = Literal["running", "succeeded", "failed"]


@dataclass(frozen=True)
class StreamState:
    """The stored state of one (account, stream)."""

    watermark: datetime | None
    state: dict[str, Any]


def read_state(conn: Connection, account: str, stream: str) -> StreamState | None:
    """The stored state, or ``None`` before the first completed pull."""
    row = conn.execute(
        sa.select(sync_state.c.watermark, sync_state.c.state).where(
            sync_state.c.account == account, sync_state.c.stream == stream
        )
    ).first()
    return None if row is None else StreamState(row.watermark, dict(row.state or {}))


def write_state(
    conn: Connection,
    account: str,
    stream: str,
    *,
    watermark: datetime | None,
    state: dict[str, Any] | None = None,
) -> None:
    """Advance the watermark (never backwards) and merge ``state``'s keys in when given."""
    stmt = pg_insert(sync_state).values(
        account=account,
        stream=stream,
        watermark=watermark,
        state=state or {},
        updated_at=sa.func.now(),
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[sync_state.c.account, sync_state.c.stream],
        set_={
            "watermark": sa.func.greatest(sync_state.c.watermark, stmt.excluded.watermark),
            # Keys merge: the stream's own (``closed_through``) beside the daemon's interval.
            "state": sync_state.c.state.op("||")(stmt.excluded.state)
            if state is not None
            else sync_state.c.state,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    conn.execute(stmt)


INTERRUPTED = "interrupted: the process ended before it could record the outcome"


def start_run(conn: Connection, account: str, stream: str, mode: Mode) -> int:
    """Open a ``running`` run; runs of the same stream left ``running`` by a killed process
    are closed as failed first (the caller holds the stream lock, so none is alive)."""
    conn.execute(
        sa.update(sync_runs)
        .where(
            sync_runs.c.account == account,
            sync_runs.c.stream == stream,
            sync_runs.c.status == "running",
        )
        .values(status="failed", finished_at=sa.func.now(), error=INTERRUPTED)
    )
    run_id: int = conn.execute(
        sa.insert(sync_runs)
        .values(account=account, stream=stream, mode=mode, status="running")
        .returning(sync_runs.c.id)
    ).scalar_one()
    return run_id


def add_to_run(conn: Connection, run_id: int, counts: Counts) -> None:
    """Add a page's counts to its run, in the page's transaction."""
    conn.execute(
        sa.update(sync_runs)
        .where(sync_runs.c.id == run_id)
        .values(
            fetched=sync_runs.c.fetched + counts.fetched,
            inserted=sync_runs.c.inserted + counts.inserted,
            updated=sync_runs.c.updated + counts.updated,
            unchanged=sync_runs.c.unchanged + counts.unchanged,
            rejected=sync_runs.c.rejected + counts.rejected,
        )
    )


def finish_run(
    conn: Connection,
    run_id: int,
    status: RunStatus,
    *,
    error: str | None = None,
    finished_at: datetime | None = None,
) -> Counts | None:
    """Close a run and return its counts (``None`` when it was closed already). A run closed as
    interrupted by another process (its outcome could not be recorded in time, the database
    being away) gets its true outcome."""
    row = conn.execute(
        sa.update(sync_runs)
        .where(
            sync_runs.c.id == run_id,
            sa.or_(sync_runs.c.status == "running", sync_runs.c.error == INTERRUPTED),
        )
        .values(
            status=status,
            finished_at=finished_at if finished_at is not None else sa.func.now(),
            error=None if error is None else storable_text(error, limit=4000),
        )
        .returning(
            sync_runs.c.fetched,
            sync_runs.c.inserted,
            sync_runs.c.updated,
            sync_runs.c.unchanged,
            sync_runs.c.rejected,
        )
    ).one_or_none()
    return None if row is None else Counts(*row)


@dataclass(frozen=True)
class OpenOrder:
    order_id: str
    ticker: str
    subaccount_number: int | None
    created_time: datetime | None


def open_orders(conn: Connection, account: str) -> list[OpenOrder]:
    """Every stored order of ``account`` still resting or pending: the ones a cycle must
    settle and whose queue positions are polled."""
    rows = conn.execute(
        sa.select(
            orders.c.order_id, orders.c.ticker, orders.c.subaccount_number, orders.c.created_time
        )
        .where(orders.c.account == account, orders.c.status.in_(("resting", "pending")))
        .order_by(orders.c.order_id)
    )
    return [
        OpenOrder(row.order_id, row.ticker, row.subaccount_number, row.created_time) for row in rows
    ]


def has_orders(conn: Connection, account: str) -> bool:
    """Whether ``orders`` holds any order of ``account``."""
    query = sa.select(sa.exists().where(orders.c.account == account))
    return bool(conn.execute(query).scalar_one())


def open_subaccounts(conn: Connection, account: str) -> set[int]:
    """The subaccounts of ``account``'s stored open orders (one query; no order is loaded)."""
    rows = conn.execute(
        sa.select(orders.c.subaccount_number)
        .where(
            orders.c.account == account,
            orders.c.status.in_(("resting", "pending")),
            orders.c.subaccount_number.is_not(None),
        )
        .distinct()
    )
    return {int(row[0]) for row in rows}


def known_subaccounts(conn: Connection, account: str) -> set[int]:
    """Every subaccount seen in ``account``'s orders and fills (0 always)."""
    rows = conn.execute(
        sa.text(
            "SELECT DISTINCT subaccount_number FROM orders WHERE account = :account "
            "AND subaccount_number IS NOT NULL "
            "UNION SELECT DISTINCT subaccount_number FROM fills WHERE account = :account"
        ),
        {"account": account},
    )
    return {0} | {int(row[0]) for row in rows}


def live_stream(stream: str) -> str:
    """The ``sync_state`` row of ``stream``'s WebSocket channel: the newest exchange time
    committed from it (``orders:stream``, ``fills:stream``)."""
    return f"{stream}:stream"


# Whose windows a ``sync_state`` row records: a backfill's (kept: any later backfill reuses
# them), or a first load's (dropped with the watermark that ends the load).
Scope = Literal["backfill", "load"]


def window_state(stream: str, scope: Scope = "backfill") -> str:
    """The ``sync_state`` row of ``stream``'s windows done (``fills:backfill``,
    ``orders:load``)."""
    return f"{stream}:{scope}"


def backfill_coverage(
    conn: Connection, account: str, stream: str = "orders", scope: Scope = "backfill"
) -> list[tuple[int, int]]:
    """The time ranges (Unix seconds, half-open) the windows of ``account``'s ``stream``
    done in ``scope`` cover, merged. Windows are keyed by their own bounds, so any later
    read, whatever its own plan, reuses them. Reads the per-command rows of earlier releases
    too."""
    row = window_state(stream, scope)
    rows = conn.execute(
        sa.select(sync_state.c.state).where(
            sync_state.c.account == account,
            sa.or_(sync_state.c.stream == row, sync_state.c.stream.like(row + ":%")),
        )
    )
    spans: list[tuple[int, int]] = []
    for (state,) in rows:
        for item in (state or {}).get("done", []):
            if isinstance(item, list) and len(item) == 2:
                spans.append((int(item[0]), int(item[1])))
            elif isinstance(item, str) and "-" in item:  # "start-end" of earlier releases
                start, _, end = item.partition("-")
                spans.append((int(start), int(end)))
    return merge_spans(spans)


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or touching ranges joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def mark_window_done(
    conn: Connection,
    account: str,
    start: int,
    end: int,
    stream: str = "orders",
    scope: Scope = "backfill",
) -> None:
    """Record [start, end) of ``stream`` as loaded, atomically with the window's last page.
    Concurrent windows serialise on the state row for the moment of their commit."""
    row = window_state(stream, scope)
    conn.execute(
        pg_insert(sync_state)
        .values(account=account, stream=row, watermark=None, state={"done": []})
        .on_conflict_do_nothing()
    )
    state = conn.execute(
        sa.select(sync_state.c.state)
        .where(sync_state.c.account == account, sync_state.c.stream == row)
        .with_for_update()
    ).scalar_one()
    spans = [(int(a), int(b)) for a, b in (state or {}).get("done", [])]
    merged = merge_spans([*spans, (start, end)])
    conn.execute(
        sa.update(sync_state)
        .where(sync_state.c.account == account, sync_state.c.stream == row)
        .values(
            state={**(state or {}), "done": [list(span) for span in merged]},
            updated_at=sa.func.now(),
        )
    )


def start_load(
    conn: Connection, account: str, stream: str, as_of: datetime
) -> tuple[datetime, list[tuple[int, int]]]:
    """A first load of ``stream`` begins (or resumes): its watermark to be, the earliest
    ``as_of`` of its attempts (what changed since an interrupted attempt began is the next
    sync's), and the windows done so far."""
    row = window_state(stream, "load")
    conn.execute(
        pg_insert(sync_state)
        .values(
            account=account,
            stream=row,
            watermark=as_of,
            state={"done": []},
            updated_at=sa.func.now(),
        )
        .on_conflict_do_nothing()
    )
    began = conn.execute(
        sa.select(sync_state.c.watermark).where(
            sync_state.c.account == account, sync_state.c.stream == row
        )
    ).scalar_one()
    return min(began or as_of, as_of), backfill_coverage(conn, account, stream, "load")


def end_load(conn: Connection, account: str, stream: str) -> None:
    """The first load of ``stream`` is complete: its windows are forgotten (in the
    transaction that writes the stream's watermark)."""
    conn.execute(
        sa.delete(sync_state).where(
            sync_state.c.account == account, sync_state.c.stream == window_state(stream, "load")
        )
    )


INTERVAL_KEY = "daemon_interval_seconds"  # in a stream's sync_state.state


def record_intervals(conn: Connection, account: str, intervals: dict[str, timedelta]) -> None:
    """Record the interval the daemon runs each stream of ``account`` at, in the stream's
    ``sync_state`` row (its watermark untouched): ``status --max-age`` judges each stream
    against three of them."""
    for stream, every in intervals.items():
        stmt = pg_insert(sync_state).values(
            account=account,
            stream=stream,
            watermark=None,
            state={INTERVAL_KEY: every.total_seconds()},
            updated_at=sa.func.now(),
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[sync_state.c.account, sync_state.c.stream],
                set_={"state": sync_state.c.state.op("||")(stmt.excluded.state)},
            )
        )


@dataclass(frozen=True)
class StreamHealth:
    """How one (account, stream) stands: its last finished run and its last success."""

    account: str
    stream: str
    last_run_id: int | None
    last_status: str | None
    last_error: str | None
    last_success: datetime | None
    problem: str | None


def stream_health(
    conn: Connection,
    *,
    now: datetime,
    max_age: timedelta | None = None,
    account: str | None = None,
) -> list[StreamHealth]:
    """Every stream with runs (of ``account``, else of all), and what is wrong with it: its
    last finished run failed, or (with ``max_age``) it has not succeeded for longer than the
    larger of ``max_age`` and three times the interval the daemon recorded for it."""
    rows = conn.execute(
        sa.text(
            """
            SELECT account, stream,
                   (array_agg(id ORDER BY id DESC) FILTER (WHERE status <> 'running'))[1]
                       AS last_run_id,
                   (array_agg(status ORDER BY id DESC) FILTER (WHERE status <> 'running'))[1]
                       AS last_status,
                   (array_agg(error ORDER BY id DESC) FILTER (WHERE status <> 'running'))[1]
                       AS last_error,
                   max(finished_at) FILTER (WHERE status = 'succeeded') AS last_success,
                   (SELECT CAST(s.state ->> :key AS float) FROM sync_state s
                    WHERE s.account = r.account AND s.stream = r.stream) AS interval_seconds
            FROM sync_runs r
            WHERE CAST(:account AS text) IS NULL OR account = CAST(:account AS text)
            GROUP BY account, stream ORDER BY account, stream
            """
        ),
        {"account": account, "key": INTERVAL_KEY},
    ).all()
    health = []
    for row in rows:
        problem = None
        # A stream the daemon runs every 10 minutes is not late after 5: judge it against
        # the larger of max_age and three of its intervals.
        limit = max_age
        if limit is not None and row.interval_seconds is not None:
            limit = max(limit, timedelta(seconds=3 * row.interval_seconds))
        if row.last_status == "failed":
            problem = f"last run #{row.last_run_id} failed: {row.last_error}"
        elif limit is not None and row.last_success is None:
            problem = "has never succeeded"
        elif limit is not None and now - row.last_success > limit:
            problem = f"no successful run for {_age(now - row.last_success)} (max {_age(limit)})"
        health.append(
            StreamHealth(
                row.account,
                row.stream,
                row.last_run_id,
                row.last_status,
                row.last_error,
                row.last_success,
                problem,
            )
        )
    return health


@dataclass(frozen=True)
class LastStart:
    """The latest run of an (account, stream), in any process."""

    ago: timedelta  # by the database's clock
    status: str  # running | succeeded | failed


def last_start(conn: Connection, account: str, stream: str) -> LastStart | None:
    """How long ago a run of (account, stream) last started, in any process, and how it
    stands; ``None`` before the first. One index probe."""
    row = conn.execute(
        sa.text(
            "SELECT now() - started_at AS ago, status FROM sync_runs "
            "WHERE account = :account AND stream = :stream ORDER BY started_at DESC LIMIT 1"
        ),
        {"account": account, "stream": stream},
    ).first()
    return None if row is None else LastStart(row.ago, str(row.status))


def last_successes(
    conn: Connection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], datetime | None]:
    """When each (account, stream) of ``keys`` last finished a successful run, whichever
    process ran it; ``None`` for never. Walks ``sync_runs`` backwards by index, so it stays
    cheap however long the history."""
    if not keys:
        return {}
    rows = conn.execute(
        sa.text(
            """
            SELECT k.account, k.stream, r.finished_at
            FROM unnest(CAST(:accounts AS text[]), CAST(:streams AS text[])) AS k(account, stream)
            LEFT JOIN LATERAL (
                SELECT s.finished_at FROM sync_runs s
                WHERE s.account = k.account AND s.stream = k.stream AND s.status = 'succeeded'
                ORDER BY s.started_at DESC LIMIT 1
            ) AS r ON true
            """
        ),
        {"accounts": [a for a, _ in keys], "streams": [s for _, s in keys]},
    )
    return {(row.account, row.stream): row.finished_at for row in rows}


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}".replace(".0" + unit, unit)
    return f"{seconds}s"
