"""Fills and settlements synced on the engine against the trading simulator: every table
equals its truth (fills of both tiers, settlements of every subaccount, scalar results), a
rerun adds nothing, a settlement captured while live survives its archival, a malformed fill
is kept in rejected_records, and a server without the endpoint is a run with nothing
fetched."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import sqlalchemy as sa

from etl.simulator import Exchange
from etl.streams.fills import FILLS
from etl.streams.settlements import SETTLEMENTS
from etl.sync.listing import backfill_listing, sync_listing
from etl.sync.orders import SyncResult, sync_orders
from tests.fix_exchange import CLI, make_client, rewriting, spawn, wait_until
from tests.sync.helpers import ACCOUNT, count, runs


def stored_fills(db) -> dict[str, dict[str, Any]]:
    with db.connect() as conn:
        return {r.fill_id: r.raw for r in conn.execute(sa.text("SELECT fill_id, raw FROM fills"))}


def fills_truth(exchange: Exchange) -> dict[str, dict[str, Any]]:
    return {fill.fill_id: fill.render() for fill in exchange.ledger.fills()}


def stored_settlements(db) -> dict[tuple[int, str], tuple[Any, ...]]:
    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT subaccount_number, ticker, market_result, revenue, value, "
                "yes_count_fp, no_count_fp, raw FROM settlements"
            )
        )
        return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def settlements_truth(exchange: Exchange) -> dict[tuple[int, str], tuple[Any, ...]]:
    return {
        (s.subaccount, s.ticker): (
            s.result,
            s.revenue,
            s.value,
            Decimal(s.yes_count).quantize(Decimal("0.01")),
            Decimal(s.no_count).quantize(Decimal("0.01")),
            s.render(),
        )
        for s in exchange.ledger.settlements(include_archived=True)
    }


def test_fills_of_both_tiers_equal_the_truth_and_a_rerun_adds_nothing(db, client, exchange):
    historical = [f for f in exchange.ledger.fills() if f.created < exchange.cutoff()]
    assert historical, "the fixture's exchange has fills only the historical tier serves"
    result = sync_listing(db, client, FILLS, account=ACCOUNT)
    assert stored_fills(db) == fills_truth(exchange)
    assert result.counts.inserted == len(fills_truth(exchange))

    again = sync_listing(db, client, FILLS, account=ACCOUNT)
    assert again.counts.inserted == again.counts.updated == 0
    assert count(db, "SELECT count(*) FROM fills") == len(fills_truth(exchange))


def test_a_first_load_of_fills_reads_windows_before_the_cutoff_from_the_historical_tier_only(
    db, app, private_key, exchange
):
    """Fills created before the cutoff's ``trades_created_ts`` are served only by the
    historical tier: a window that ends before it costs no call to the live listing."""
    cutoff = exchange.cutoff()
    assert cutoff is not None
    sync_listing(db, make_client(app, private_key, page_size=20), FILLS, account=ACCOUNT)
    assert stored_fills(db) == fills_truth(exchange)
    before = int((cutoff - timedelta(minutes=1)).timestamp())

    def ends(path: str) -> list[int]:  # the max_ts of each fills listing (an open end: none)
        listed = [parse_qs(q) for p, q in app.requests if p.endswith(path)]
        return [int(q["max_ts"][0]) if "max_ts" in q else 2**40 for q in listed]

    assert min(ends("/historical/fills")) <= before
    assert min(ends("/portfolio/fills")) > before


def test_new_fills_are_read_incrementally_while_the_exchange_trades(db, client, exchange):
    sync_listing(db, client, FILLS, account=ACCOUNT)
    for _ in range(3):
        exchange.step(40, every=timedelta(seconds=1))
        sync_listing(db, client, FILLS, account=ACCOUNT)
    assert stored_fills(db) == fills_truth(exchange)
    assert all(run.status == "succeeded" for run in runs(db))


def test_a_fills_backfill_in_windows_equals_the_truth_and_a_rerun_reads_nothing(
    db, client, exchange
):
    cutoff = exchange.cutoff()
    truth = fills_truth(exchange)
    oldest = min(f.created for f in exchange.ledger.fills())
    assert cutoff is not None and oldest < cutoff  # some are only in the historical tier
    since = oldest - timedelta(days=1)

    def backfill() -> SyncResult:
        return backfill_listing(
            db, client, FILLS, account=ACCOUNT, since=since, until=exchange.now,
            window=timedelta(days=7), concurrency=3,
        )  # fmt: skip

    first = backfill()
    assert stored_fills(db) == truth
    assert first.counts.inserted == len(truth)
    again = backfill()
    assert again.counts.fetched == 0  # every window is done
    done = [(r.stream, r.mode, r.status) for r in runs(db)]
    assert done == [("fills", "backfill", "succeeded")] * 2
    with db.connect() as conn:
        states = dict(conn.execute(sa.text("SELECT stream, watermark FROM sync_state")).all())
    assert set(states) == {"fills:backfill"}  # the incremental watermark is left alone


@pytest.mark.slow
def test_a_fills_sync_killed_mid_pull_converges_on_rerun_without_duplicates(
    db, live_simulator, exchange
):
    live_simulator.app.faults.latency = 0.03
    env = {**live_simulator.env, "KALSHI_PAGE_SIZE": "10"}
    proc = spawn(["sync", "--streams", "fills"], env)
    wait_until(lambda: count(db, "SELECT count(*) FROM fills") >= 30)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.communicate()
    truth = fills_truth(exchange)
    assert 0 < count(db, "SELECT count(*) FROM fills") < len(truth)
    live_simulator.app.faults.latency = 0
    rerun = subprocess.run(
        [*CLI, "sync", "--streams", "fills"], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert stored_fills(db) == truth
    assert count(db, "SELECT count(*) FROM fills") == len(truth)
    first, second = runs(db)
    assert first.status == "failed" and first.error.startswith("interrupted")
    assert second.status == "succeeded"


def test_the_fills_of_an_order_add_up_to_its_fill_count_and_fees(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    sync_listing(db, client, FILLS, account=ACCOUNT)
    mismatched = count(
        db,
        """
        SELECT count(*) FROM orders o
        LEFT JOIN (SELECT order_id, sum(count_fp) AS n, sum(fee_cost) AS fees
                   FROM fills GROUP BY order_id) f ON f.order_id = o.order_id
        WHERE coalesce(f.n, 0) <> o.fill_count_fp
           OR coalesce(f.fees, 0) <> o.taker_fees_dollars + o.maker_fees_dollars
        """,
    )
    assert mismatched == 0


def test_settlements_of_every_subaccount_equal_the_truth_and_survive_archival(db, client, exchange):
    yes, no, scalar = exchange.tickers[:3]
    exchange.settle_market(yes, "yes")
    exchange.settle_market(no, "no")
    exchange.settle_market(scalar, "scalar", 50)
    assert {s.subaccount for s in exchange.ledger.settlements()} == {0, 1}
    sync_listing(db, client, SETTLEMENTS, account=ACCOUNT)
    assert stored_settlements(db) == settlements_truth(exchange)

    event = yes.rsplit("-", 1)[0]
    assert exchange.archive_event(event) > 0  # gone from the API for good
    result = sync_listing(db, client, SETTLEMENTS, account=ACCOUNT)
    assert result.counts.fetched < len(settlements_truth(exchange))
    assert stored_settlements(db) == settlements_truth(exchange)  # the rows stay


def test_a_malformed_fill_is_kept_in_rejected_records_and_the_rest_is_written(
    db, app, private_key, exchange
):
    def corrupt(request: httpx.Request, body: dict) -> dict:
        if request.url.path.endswith("/portfolio/fills") and not body.get("cursor"):
            # the last page, which has room for one more
            body["fills"].append({"fill_id": "bad-1", "ticker": "M", "count_fp": "many"})
        return body

    client = make_client(rewriting(app, corrupt), private_key)
    result = sync_listing(db, client, FILLS, account=ACCOUNT)
    assert result.counts.rejected >= 1
    with db.connect() as conn:
        errors = conn.execute(
            sa.text("SELECT error FROM rejected_records WHERE stream = 'fills'")
        ).scalars()
        assert [e for e in errors if "bad-1" in e and "count_fp" in e]
    assert stored_fills(db) == fills_truth(exchange)
    assert runs(db)[-1].status == "succeeded"


def test_a_server_without_the_endpoint_is_a_run_with_nothing_fetched(db, app, private_key):
    def without_settlements(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/portfolio/settlements"):
            return httpx.Response(404, json={"code": "not_found", "message": "not found"})
        answer = httpx.WSGITransport(app=app).handle_request(request)
        answer.read()
        return httpx.Response(answer.status_code, content=answer.content)

    client = make_client(httpx.MockTransport(without_settlements), private_key)
    result = sync_listing(db, client, SETTLEMENTS, account=ACCOUNT)
    assert result.counts.fetched == 0
    assert runs(db)[-1].status == "succeeded"


def test_verify_of_fills_and_settlements_is_equal_after_a_sync_and_repairs_tampering(
    db, client, exchange
):
    from etl.sync.verify import verify_listing

    exchange.settle_market(exchange.tickers[0], "scalar", 72)
    sync_orders(db, client, account=ACCOUNT)
    for stream in (FILLS, SETTLEMENTS):
        sync_listing(db, client, stream, account=ACCOUNT)
        assert verify_listing(db, client, stream, account=ACCOUNT).equal, stream.name
    fills_check = verify_listing(db, client, FILLS, account=ACCOUNT).fills_check
    assert fills_check is not None and fills_check.missing_fills == 0

    with db.begin() as conn:  # tampering: a fill lost, one changed, one settlement changed
        gone = conn.execute(
            sa.text(
                "DELETE FROM fills WHERE fill_id = (SELECT min(fill_id) FROM fills) "
                "RETURNING order_id"
            )
        ).scalar_one()
        conn.execute(
            sa.text(
                "UPDATE fills SET raw = raw || '{\"x\": 1}' "
                "WHERE fill_id = (SELECT max(fill_id) FROM fills)"
            )
        )
        conn.execute(sa.text("UPDATE settlements SET raw = raw || '{\"x\": 1}'"))
    fills_result = verify_listing(db, client, FILLS, account=ACCOUNT)
    assert fills_result.before.counts == {"missing": 1, "stale": 1, "extra": 0}
    assert not fills_result.equal
    assert fills_result.fills_check is not None
    if exchange.order(gone).status in ("executed", "canceled"):
        assert fills_result.fills_check.missing_fills == 1
    settled = verify_listing(db, client, SETTLEMENTS, account=ACCOUNT)
    assert settled.before.counts["stale"] == len(exchange.ledger.settlements())

    for stream in (FILLS, SETTLEMENTS):
        repaired = verify_listing(db, client, stream, account=ACCOUNT, repair=True)
        assert repaired.after is not None and repaired.after.equal, stream.name
        assert verify_listing(db, client, stream, account=ACCOUNT).equal
    assert stored_fills(db) == fills_truth(exchange)


def test_an_archived_settlement_is_never_extra(db, client, exchange):
    from etl.sync.verify import verify_listing

    exchange.settle_market(exchange.tickers[1], "no")
    sync_listing(db, client, SETTLEMENTS, account=ACCOUNT)
    exchange.archive_event(exchange.tickers[1].rsplit("-", 1)[0])
    assert verify_listing(db, client, SETTLEMENTS, account=ACCOUNT).equal


def test_verify_without_a_fills_endpoint_checks_no_fills_against_orders(db, app, private_key):
    from etl.sync.verify import verify_listing

    def without_fills(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/fills"):
            return httpx.Response(404, json={"code": "not_found", "message": "not found"})
        answer = httpx.WSGITransport(app=app).handle_request(request)
        answer.read()
        return httpx.Response(answer.status_code, content=answer.content)

    client = make_client(httpx.MockTransport(without_fills), private_key)
    sync_orders(db, client, account=ACCOUNT)
    result = verify_listing(db, client, FILLS, account=ACCOUNT)
    assert result.fills_check is None and result.equal


def test_a_key_refused_the_subaccount_balances_still_gets_its_settlements(
    db, app, private_key, exchange
):
    def refusing(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/subaccounts/balances"):
            return httpx.Response(403, json={"code": "forbidden", "message": "not allowed"})
        answer = httpx.WSGITransport(app=app).handle_request(request)
        answer.read()
        return httpx.Response(answer.status_code, content=answer.content)

    exchange.settle_market(exchange.tickers[0], "yes")
    client = make_client(httpx.MockTransport(refusing), private_key)
    sync_orders(db, client, account=ACCOUNT)  # subaccounts 0 and 1, found in the orders
    sync_listing(db, client, SETTLEMENTS, account=ACCOUNT)
    assert stored_settlements(db) == settlements_truth(exchange)
    assert runs(db)[-1].status == "succeeded"
