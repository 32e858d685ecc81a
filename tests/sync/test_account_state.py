"""Positions, balance and cash movements synced on the engine against the trading simulator:
the latest snapshot of every series equals the simulator's truth in subaccount 0 and the
others, syncs with nothing changed add no rows, a market no longer listed gets one row with
``position_fp`` 0 (only after a complete listing), archived events' positions land in
``archived_positions``, a cash movement's newer status replaces the old one, a malformed
record is kept in ``rejected_records``, and a sync killed mid-run converges on rerun."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from etl.kalshi.parse import Rejected
from etl.kalshi.parse.account import (
    BALANCE_COLUMNS,
    CASH_COLUMNS,
    POSITION_COLUMNS,
    parse_balance,
    parse_cash,
    parse_position,
)
from etl.simulator import Exchange
from etl.streams.balance import BALANCE
from etl.streams.cash import CASH
from etl.streams.positions import POSITIONS
from etl.sync.listing import sync_listing
from tests.fix_exchange import CLI, make_client, rewriting, spawn, wait_until
from tests.sync.helpers import ACCOUNT, count, runs

POSITION_VALUES = POSITION_COLUMNS[:-1]  # raw aside
BALANCE_VALUES = BALANCE_COLUMNS[:-1]
CASH_VALUES = CASH_COLUMNS[:-1]


def values(record: Any, columns: tuple[str, ...]) -> tuple[Any, ...]:
    assert not isinstance(record, Rejected), record
    return tuple(getattr(record, c) for c in columns)


def latest(db, table: str, columns: tuple[str, ...], series: str) -> dict[tuple[Any, ...], Any]:
    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT DISTINCT ON ({series}) {', '.join(columns)} FROM {table} "
                f"ORDER BY {series}, captured_at DESC"
            )
        )
        return {tuple(r[: series.count(",") + 1]): tuple(r) for r in rows}


def stored_positions(db) -> dict[tuple[Any, ...], Any]:
    """The latest snapshot of each market that still holds or ever held something listed."""
    return latest(db, "position_snapshots", POSITION_VALUES, "subaccount_number, ticker")


def positions_truth(exchange: Exchange) -> dict[tuple[Any, ...], Any]:
    truth = {}
    for position in exchange.money.positions(archived=False):
        parsed = parse_position(position.render(), subaccount=position.subaccount)
        truth[(position.subaccount, position.ticker)] = values(parsed, POSITION_VALUES)
    return truth


def stored_balances(db) -> dict[tuple[Any, ...], Any]:
    return latest(db, "balance_snapshots", BALANCE_VALUES, "subaccount_number")


def balances_truth(exchange: Exchange) -> dict[tuple[Any, ...], Any]:
    return {
        (n,): values(parse_balance(exchange.money.balance(n), subaccount=n), BALANCE_VALUES)
        for n in exchange.subaccounts()
    }


def stored_cash(db) -> dict[tuple[Any, ...], Any]:
    with db.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {', '.join(CASH_VALUES)} FROM cash_movements"))
        return {(r.kind, r.id): tuple(r) for r in rows}


def cash_truth(exchange: Exchange) -> dict[tuple[Any, ...], Any]:
    return {
        (c.kind, c.id): values(parse_cash(c.render(), kind=c.kind), CASH_VALUES)
        for c in exchange.money.cash.values()
    }


def sync_all(db, client) -> None:
    for stream in (POSITIONS, BALANCE, CASH):
        result = sync_listing(db, client, stream, account=ACCOUNT)
        assert result.counts.rejected == 0, stream.name


def assert_equal_truth(db, exchange: Exchange) -> None:
    assert stored_positions(db) == positions_truth(exchange)
    assert stored_balances(db) == balances_truth(exchange)
    assert stored_cash(db) == cash_truth(exchange)


def test_positions_balances_and_cash_equal_the_truth_as_the_account_trades(db, client, exchange):
    assert {p.subaccount for p in exchange.money.positions(archived=False)} == {0, 1}
    sync_all(db, client)
    assert_equal_truth(db, exchange)

    for round_ in range(4):  # trading, a settlement at 0.50, money in and out, between syncs
        exchange.step(40, every=timedelta(seconds=1))
        if round_ == 0:
            exchange.settle_market(exchange.tickers[0], "scalar", 50)
        if round_ == 1:
            pending = next(c for c in exchange.money.cash.values() if c.status == "pending")
            exchange.money.finalize(pending.kind, pending.id, "applied", exchange.now)
            exchange.money.move(
                "transfer", 12_345, exchange.now, from_subaccount=1, to_subaccount=0
            )
        if round_ == 2:
            exchange.money.move("withdrawal", 5_000, exchange.now, fee=100)
            exchange.money.move("deposit", 250_000, exchange.now, fee=0)
            exchange.settle_market(exchange.tickers[1], "yes")
        sync_all(db, client)
        assert_equal_truth(db, exchange)

    settled = [p for p in exchange.money.positions(archived=False) if p.settled]
    assert settled and all(p.position == 0 for p in settled)
    with db.connect() as conn:
        statuses = conn.execute(sa.text("SELECT DISTINCT status FROM cash_movements")).scalars()
        assert {"applied", "failed"} <= set(statuses)
        current = conn.execute(sa.text("SELECT count(*) FROM positions_current")).scalar_one()
    assert current == sum(1 for p in exchange.money.positions(archived=False) if p.position)

    rows = {t: count(db, f"SELECT count(*) FROM {t}") for t in ("position_snapshots",
            "balance_snapshots", "cash_movements")}  # fmt: skip
    for _ in range(3):  # nothing changed: nothing written
        sync_all(db, client)
    assert rows == {t: count(db, f"SELECT count(*) FROM {t}") for t in rows}


def test_a_market_no_longer_listed_gets_one_zero_row_and_archived_positions_are_kept(
    db, client, exchange
):
    sync_all(db, client)
    held = next(p for p in exchange.money.positions(archived=False) if p.position)
    exchange.archive_event(held.event_ticker)  # its markets leave /portfolio/positions
    archived = list(exchange.money.positions(archived=True))
    assert held in archived

    for _ in range(2):  # the closing row is written once
        sync_listing(db, client, POSITIONS, account=ACCOUNT)
    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT position_fp, market_exposure_dollars, raw FROM position_snapshots "
                "WHERE subaccount_number = :s AND ticker = :t ORDER BY captured_at"
            ),
            {"s": held.subaccount, "t": held.ticker},
        ).all()
        stored_archive = conn.execute(
            sa.text("SELECT subaccount_number, ticker, position_fp FROM archived_positions")
        ).all()
    assert rows[-1].position_fp == 0 and rows[-1].market_exposure_dollars == 0
    assert rows[-1].raw == {"no_longer_listed": True}
    assert sum(1 for r in rows if r.position_fp == 0) == 1
    assert {(s, t) for s, t, _ in stored_archive} == {(p.subaccount, p.ticker) for p in archived}
    assert (held.subaccount, held.ticker, Decimal(held.position)) in stored_archive
    with db.connect() as conn:
        shown = conn.execute(sa.text("SELECT ticker FROM positions_current")).scalars().all()
    assert held.ticker not in shown


def test_a_listing_cut_short_closes_nothing(db, app, private_key, exchange):
    sync_all(db, make_client(app, private_key))
    held = next(p for p in exchange.money.positions(archived=False) if p.position)
    exchange.archive_event(held.event_ticker)
    before = count(db, "SELECT count(*) FROM position_snapshots")

    def failing(request: httpx.Request) -> httpx.Response:
        if (
            request.url.path.endswith("/portfolio/positions")
            and "cursor" in request.url.query.decode()
        ):
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "down"}})
        return httpx.WSGITransport(app=app).handle_request(request)

    cut = make_client(httpx.MockTransport(failing), private_key, page_size=5)
    with pytest.raises(Exception, match="503"):
        sync_listing(db, cut, POSITIONS, account=ACCOUNT)
    assert count(db, "SELECT count(*) FROM position_snapshots WHERE position_fp = 0 "
                     "AND raw ? 'no_longer_listed'") == 0  # fmt: skip
    assert count(db, "SELECT count(*) FROM position_snapshots") == before
    assert runs(db)[-1].status == "failed"


def test_malformed_positions_and_cash_movements_are_kept_in_rejected_records(
    db, app, private_key, exchange
):
    def corrupt(request: httpx.Request, body: dict) -> dict:
        if request.url.path.endswith("/portfolio/positions"):
            body["market_positions"].append({"ticker": "BAD-1", "position_fp": "lots"})
        if request.url.path.endswith("/portfolio/deposits"):
            body["deposits"].append({"id": "dep-bad", "status": "lost", "amount_cents": 1})
        return body

    client = make_client(rewriting(app, corrupt), private_key)
    for stream in (POSITIONS, CASH):
        sync_listing(db, client, stream, account=ACCOUNT)
    with db.connect() as conn:
        kept = conn.execute(sa.text("SELECT stream, error FROM rejected_records")).all()
    assert any(s == "positions" and "BAD-1" in e and "position_fp" in e for s, e in kept)
    assert any(s == "cash" and "dep-bad" in e and "status" in e for s, e in kept)
    assert stored_cash(db) == cash_truth(exchange)
    # A listing with a record it could not read closes nothing: that market is unknown.
    assert count(db, "SELECT count(*) FROM position_snapshots WHERE raw ? 'no_longer_listed'") == 0


@pytest.mark.slow
def test_a_sync_of_the_account_state_killed_mid_run_converges_on_rerun(
    db, live_simulator, exchange
):
    live_simulator.app.faults.latency = 0.05
    env = {**live_simulator.env, "KALSHI_PAGE_SIZE": "3"}
    streams = ["--streams", "positions,balance,cash"]
    proc = spawn(["sync", *streams], env)
    wait_until(lambda: count(db, "SELECT count(*) FROM position_snapshots") >= 6)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.communicate()
    assert count(db, "SELECT count(*) FROM position_snapshots") < len(positions_truth(exchange))
    live_simulator.app.faults.latency = 0
    rerun = subprocess.run([*CLI, "sync", *streams], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_equal_truth(db, exchange)
    assert count(db, "SELECT count(*) FROM position_snapshots WHERE raw ? 'no_longer_listed'") == 0


def test_verify_of_cash_is_equal_after_a_sync_and_repairs_tampering(db, client, exchange):
    from etl.sync.verify import verify_listing

    sync_listing(db, client, CASH, account=ACCOUNT)
    assert verify_listing(db, client, CASH, account=ACCOUNT).equal
    with db.begin() as conn:  # one movement lost, one with an older status
        conn.execute(sa.text("DELETE FROM cash_movements WHERE kind = 'transfer'"))
        conn.execute(
            sa.text(
                "UPDATE cash_movements SET status = 'pending', raw = raw || '{\"status\": "
                "\"pending\"}' WHERE kind = 'withdrawal' AND status = 'applied'"
            )
        )
    tampered = verify_listing(db, client, CASH, account=ACCOUNT)
    assert not tampered.equal
    assert tampered.before.counts["missing"] >= 1 and tampered.before.counts["stale"] == 1
    repaired = verify_listing(db, client, CASH, account=ACCOUNT, repair=True)
    assert repaired.after is not None and repaired.after.equal
    assert stored_cash(db) == cash_truth(exchange)
