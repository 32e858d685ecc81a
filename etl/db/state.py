"""Sync state: watermarks (``sync_state``) and run history (``sync_runs``).

Every function runs in the caller's transaction, so a watermark lands atomically with the rows
it covers. A watermark never moves backwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from etl.db.models import orders, sync_runs, sync_state
from etl.db.upsert import Counts

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
    """Advance the watermark (never backwards) and replace ``state`` when given."""
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
            "state": stmt.excluded.state if state is not None else sync_state.c.state,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    conn.execute(stmt)


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
        .values(status="failed", finished_at=sa.func.now(), error="interrupted")
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
    conn: Connection, run_id: int, status: RunStatus, *, error: str | None = None
) -> None:
    conn.execute(
        sa.update(sync_runs)
        .where(sync_runs.c.id == run_id)
        .values(status=status, finished_at=sa.func.now(), error=error)
    )


@dataclass(frozen=True)
class OpenOrder:
    order_id: str
    ticker: str
    subaccount_number: int | None
    created_time: datetime | None


def open_orders(conn: Connection) -> list[OpenOrder]:
    """Every stored order still resting or pending: the ones a cycle must settle and whose
    queue positions are polled."""
    rows = conn.execute(
        sa.select(
            orders.c.order_id, orders.c.ticker, orders.c.subaccount_number, orders.c.created_time
        )
        .where(orders.c.status.in_(("resting", "pending")))
        .order_by(orders.c.order_id)
    )
    return [
        OpenOrder(row.order_id, row.ticker, row.subaccount_number, row.created_time) for row in rows
    ]


def windows_done(conn: Connection, account: str, stream: str) -> set[str]:
    """The window keys a resumable job has completed."""
    stored = read_state(conn, account, stream)
    return set(stored.state.get("done", [])) if stored else set()


def mark_window_done(conn: Connection, account: str, stream: str, window: str) -> None:
    """Record one completed window, atomically with the window's last page."""
    stmt = pg_insert(sync_state).values(
        account=account, stream=stream, watermark=None, state={"done": [window]}
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[sync_state.c.account, sync_state.c.stream],
        set_={
            "state": sa.func.jsonb_set(
                sync_state.c.state,
                sa.literal_column("'{done}'"),
                sa.func.coalesce(sync_state.c.state["done"], sa.text("'[]'::jsonb")).op("||")(
                    sa.func.to_jsonb(sa.cast(window, sa.Text))
                ),
            ),
            "updated_at": sa.func.now(),
        },
    )
    conn.execute(stmt)
