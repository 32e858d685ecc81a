"""Sync state: the watermark never moves backwards, runs are recorded, the advisory lock keeps
two runs of one account and stream apart."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from etl.db.engine import mask, stream_lock
from etl.db.state import (
    INTERRUPTED,
    StreamState,
    finish_run,
    read_state,
    start_run,
    write_state,
)
from etl.errors import LockBusyError

T1 = datetime(2026, 1, 1, tzinfo=UTC)
T2 = datetime(2026, 1, 2, tzinfo=UTC)


def watermark_of(state: StreamState | None):
    assert state is not None
    return state.watermark


def test_the_watermark_never_moves_backwards(db):
    with db.begin() as conn:
        write_state(conn, "acct", "orders", watermark=T2)
        write_state(conn, "acct", "orders", watermark=T1)
        assert watermark_of(read_state(conn, "acct", "orders")) == T2


def test_no_state_before_the_first_pull(db):
    with db.connect() as conn:
        assert read_state(conn, "acct", "orders") is None


def test_a_run_left_running_by_a_killed_process_is_closed_as_interrupted(db):
    with db.begin() as conn:
        first = start_run(conn, "acct", "orders", "incremental")
        second = start_run(conn, "acct", "orders", "incremental")
        finish_run(conn, second, "succeeded")
        rows = dict(conn.exec_driver_sql("SELECT id, error FROM sync_runs").all())
    assert rows == {first: INTERRUPTED, second: None}


def test_a_second_holder_waits_then_gives_up_naming_the_stream(db):
    with stream_lock(db, "acct", "orders"):
        started = time.monotonic()
        with pytest.raises(LockBusyError, match="holds the orders lock for account acct"):
            with stream_lock(db, "acct", "orders", wait=0.5):
                pass
        assert time.monotonic() - started >= 0.5


def test_a_second_holder_gets_the_lock_once_the_first_releases_it(db):
    order: list[str] = []
    release = threading.Event()

    def first() -> None:
        with stream_lock(db, "acct", "orders"):
            order.append("first in")
            release.wait(5)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    while not order:
        time.sleep(0.01)
    threading.Timer(0.3, release.set).start()
    with stream_lock(db, "acct", "orders", wait=5):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]


def test_other_streams_and_accounts_do_not_block(db):
    with stream_lock(db, "acct", "orders"):
        with stream_lock(db, "acct", "queue_positions", wait=0):
            with stream_lock(db, "other", "orders", wait=0):
                pass


def test_masked_urls_hide_the_password():
    assert mask("postgresql+psycopg://u:hunter2@h:5432/d") == "postgresql+psycopg://u:***@h:5432/d"


def test_status_max_age_judges_a_stream_against_three_of_its_daemon_intervals(db):
    from datetime import UTC, datetime, timedelta

    from etl.db.state import finish_run, record_intervals, start_run, stream_health

    now = datetime.now(UTC)
    with db.begin() as conn:
        for stream in ("settlements", "orders"):
            run_id = start_run(conn, "acct", stream, "incremental")
            finish_run(conn, run_id, "succeeded", finished_at=now - timedelta(minutes=20))
        record_intervals(conn, "acct", {"settlements": timedelta(minutes=10)})
        write_state(conn, "acct", "settlements", watermark=now, state={"other": 1})
    with db.connect() as conn:
        health = {h.stream: h for h in stream_health(conn, now=now, max_age=timedelta(minutes=5))}
    assert health["settlements"].problem is None  # 20 min < 3 × 10 min
    assert health["orders"].problem is not None  # no interval recorded: max_age holds
    assert "max 5m" in health["orders"].problem
