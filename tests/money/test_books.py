"""The money over PostgreSQL, against the trading simulator: after a long run with partial
fills, opposite-side closes, yes/no/0.50 settlements, deposits, withdrawals and transfers in
two subaccounts, ``pnl_by_market`` equals the simulator's own FIFO P&L per market to the cent
and the cash check balances to exactly 0.00; a lost fill unbalances it and is named; marks
are written with the change and survive a rebuild that read an older one."""

from __future__ import annotations

import csv
import re
import subprocess
from datetime import timedelta
from decimal import Decimal

import sqlalchemy as sa

from etl.money.books import books, explain
from etl.money.lots import rebuild_marked
from etl.money.report import headline
from etl.simulator import Exchange
from etl.streams.registry import LISTINGS
from etl.sync.listing import sync_listing
from etl.sync.orders import sync_orders
from tests.fix_exchange import CLI
from tests.sync.helpers import ACCOUNT, count

CENT = Decimal("0.01")


def trade_for_a_while(exchange: Exchange) -> None:
    """Trading with settlements of every kind and money moving in and out."""
    exchange.step(150, every=timedelta(seconds=5))
    exchange.settle_market(exchange.tickers[0], "yes")
    exchange.settle_market(exchange.tickers[0], "no")
    exchange.settle_market(exchange.tickers[0], "scalar", 50)
    exchange.money.move("withdrawal", 20_000, exchange.now, fee=150)
    exchange.money.move("transfer", 7_000, exchange.now, from_subaccount=0, to_subaccount=1)
    pending = next(c for c in exchange.money.cash.values() if c.status == "pending")
    exchange.money.finalize(pending.kind, pending.id, "applied", exchange.now)
    exchange.step(150, every=timedelta(seconds=5))


def sync_everything(db, client) -> None:
    sync_orders(db, client, account=ACCOUNT)
    for stream in LISTINGS.values():
        sync_listing(db, client, stream, account=ACCOUNT)
    rebuild_marked(db, ACCOUNT)


def test_pnl_by_market_equals_the_simulators_fifo_pnl_to_the_cent(db, client, exchange):
    trade_for_a_while(exchange)
    sync_everything(db, client)
    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT subaccount_number, ticker, realized_pnl_before_fees_dollars, "
                "open_position_fp, open_cost_dollars, fees_dollars, market_result "
                "FROM pnl_by_market WHERE account = :a"
            ),
            {"a": ACCOUNT},
        ).all()
    ours = {(r[0], r[1]): (r[2].quantize(CENT), r[3], r[4].quantize(CENT), r[5]) for r in rows}
    truth = {
        (p.subaccount, p.ticker): (
            (Decimal(p.realized) / 100).quantize(CENT),
            Decimal(p.position),
            (Decimal(p.exposure) / 100).quantize(CENT),
            Decimal(p.fees) / 100,
        )
        for p in exchange.money.books().positions.values()
    }
    assert ours == truth
    assert {r.market_result for r in rows} >= {"yes", "no", "scalar"}
    assert {r[0] for r in rows} == {0, 1}
    closes = count(db, "SELECT count(*) FROM pnl_lots WHERE close_type = 'trade'")
    settled = count(db, "SELECT count(*) FROM pnl_lots WHERE close_type = 'settlement'")
    assert closes > 10 and settled > 0


def test_the_books_balance_to_the_cent_and_a_lost_fill_is_named(db, client, exchange):
    trade_for_a_while(exchange)
    sync_everything(db, client)
    with db.connect() as conn:
        balanced = books(conn, ACCOUNT)
    assert balanced.residual == 0
    assert balanced.deposits > 0 and balanced.withdrawals > 0 and balanced.settlements > 0
    assert balanced.balance_now == sum(
        Decimal(exchange.money.balance(n)["balance_dollars"]) for n in exchange.subaccounts()
    )

    with db.begin() as conn:  # a fill lost: the books no longer balance, and say which
        lost = conn.execute(
            sa.text(
                "DELETE FROM fills WHERE fill_id = (SELECT max(fill_id) FROM fills "
                "WHERE order_id IS NOT NULL) RETURNING order_id"
            )
        ).scalar_one()
    with db.connect() as conn:
        short = books(conn, ACCOUNT)
        gaps = explain(conn, ACCOUNT)
    assert short.residual != 0
    assert any(lost in gap.what for gap in gaps)


def test_pnl_books_and_report_from_the_command_line(db, live_simulator, exchange, tmp_path):
    """One synced account, then: `pnl --csv` in the tax-export layout, `--year` selecting by
    close time, `report` as one offline page with the views' numbers, `books` balanced, and
    after a lost fill `books` exits 1 naming its order."""
    trade_for_a_while(exchange)
    env = live_simulator.env
    assert subprocess.run([*CLI, "sync"], env=env, capture_output=True).returncode == 0

    out = tmp_path / "lots.csv"
    done = subprocess.run([*CLI, "pnl", "--csv", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "realized" in done.stdout and "win rate" in done.stdout
    with out.open() as f:
        rows = list(csv.reader(f))
    assert rows[0][:12] == [
        "type", "quantity_fp", "market_ticker", "side", "entry_price_dollars",
        "exit_price_dollars", "open_fees_dollars", "close_fees_dollars",
        "realized_pnl_without_fees_dollars", "realized_pnl_with_fees_dollars",
        "close_timestamp", "open_timestamp",
    ]  # fmt: skip
    closed = count(db, "SELECT count(*) FROM pnl_lots WHERE close_time IS NOT NULL")
    assert len(rows) - 1 == closed > 0
    assert {r[0] for r in rows[1:]} <= {"trade", "settlement"}
    total = sum(Decimal(r[9]) for r in rows[1:])
    with db.connect() as conn:
        assert (
            total
            == conn.execute(
                sa.text("SELECT sum(realized_pnl_dollars) FROM pnl_by_market")
            ).scalar_one()
        )
    other = subprocess.run(
        [*CLI, "pnl", "--year", str(exchange.now.year + 1), "--csv", str(out)],
        env=env,
        capture_output=True,
    )
    assert other.returncode == 0
    assert len(out.read_text().splitlines()) == 1  # a year with no closed lot: the header

    assert_report(db, env, tmp_path)

    ok = subprocess.run([*CLI, "books"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "residual" in ok.stdout and "$0.00" in ok.stdout and "balanced" in ok.stdout
    with db.begin() as conn:
        lost = conn.execute(
            sa.text(
                "DELETE FROM fills WHERE fill_id = (SELECT min(fill_id) FROM fills) "
                "RETURNING order_id"
            )
        ).scalar_one()
    short = subprocess.run([*CLI, "books"], env=env, capture_output=True, text=True)
    assert short.returncode == 1, short.stdout + short.stderr
    assert "NOT BALANCED" in short.stdout and f"order {lost}" in short.stdout


def assert_report(db, env: dict[str, str], tmp_path) -> None:
    """`report` writes one page that works offline (plotly.js inlined, nothing fetched), whose
    headline figures are the views' numbers."""
    page = tmp_path / "out" / "r.html"
    page.parent.mkdir()
    done = subprocess.run(
        [*CLI, "report", "-o", str(page)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert str(page.resolve()) in done.stdout
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=", text), "a script fetched from elsewhere"
    assert not re.search(r"<link[^>]+href=", text), "a style sheet fetched from elsewhere"
    assert "Plotly.newPlot" in text
    with db.connect() as conn:
        h = headline(conn, env["KALSHI_API_KEY_ID"])
        realized = conn.execute(
            sa.text("SELECT sum(realized_pnl_dollars) FROM pnl_by_market")
        ).scalar_one()
    assert h.realized == realized
    assert f"{'-' if realized < 0 else ''}${abs(realized):,.2f}" in text
    for title in ("Cumulative realized P", "Balance", "by series", "by market",
                  "Fees and fills per day", "Open positions", "Queue positions"):  # fmt: skip
        assert title in text, title


def test_a_change_marks_its_market_and_a_mark_made_during_a_rebuild_survives(db, client, exchange):
    sync_listing(db, client, LISTINGS["fills"], account=ACCOUNT)
    marked = count(db, "SELECT count(*) FROM pnl_marks")
    assert marked == count(db, "SELECT count(DISTINCT (subaccount_number, ticker)) FROM fills")
    with db.connect() as conn:
        sub, ticker, version = conn.execute(
            sa.text("SELECT subaccount_number, ticker, version FROM pnl_marks LIMIT 1")
        ).one()
    with db.begin() as conn:  # marked again (a new fill) after a rebuild read the mark
        conn.execute(
            sa.text(
                "INSERT INTO pnl_marks (account, subaccount_number, ticker) VALUES (:a, :s, :t) "
                "ON CONFLICT (account, subaccount_number, ticker) "
                "DO UPDATE SET version = nextval('pnl_mark_seq')"
            ),
            {"a": ACCOUNT, "s": sub, "t": ticker},
        )
        conn.execute(
            sa.text(
                "DELETE FROM pnl_marks WHERE subaccount_number = :s AND ticker = :t "
                "AND version = :v"
            ),
            {"s": sub, "t": ticker, "v": version},
        )
    assert count(db, "SELECT count(*) FROM pnl_marks") == marked  # still marked
    rebuilt = rebuild_marked(db, ACCOUNT)
    assert rebuilt.markets == marked and count(db, "SELECT count(*) FROM pnl_marks") == 0
    again = rebuild_marked(db, ACCOUNT)
    assert again.markets == 0


def test_our_pnl_agrees_with_kalshis_positions_and_settlements_and_differences_are_listed(
    db, client, exchange
):
    from etl.money.checks import check_money

    trade_for_a_while(exchange)
    sync_everything(db, client)
    with db.connect() as conn:
        agreed = check_money(conn, ACCOUNT)
    assert agreed.markets_compared > 10 and agreed.markets_differing == 0
    assert agreed.settlements_compared >= 3 and agreed.settlements_differing == 0

    with db.begin() as conn:  # Kalshi's figure for one market moves; one revenue is off
        conn.execute(
            sa.text(
                "INSERT INTO position_snapshots (account, subaccount_number, ticker, "
                "captured_at, position_fp, realized_pnl_dollars, raw) "
                "SELECT account, subaccount_number, ticker, now() + interval '1 hour', "
                "position_fp, realized_pnl_dollars + 5, raw FROM position_snapshots "
                "WHERE ticker = :t ORDER BY captured_at DESC LIMIT 1"
            ),
            {"t": exchange.tickers[-1]},
        )
        conn.execute(sa.text("UPDATE settlements SET revenue = revenue + 100 WHERE revenue > 0"))
    with db.connect() as conn:
        found = check_money(conn, ACCOUNT)
    assert found.markets_differing == 1 and exchange.tickers[-1] in found.market_examples[0]
    assert found.settlements_differing >= 1 and "revenue" in found.settlement_examples[0]


def test_the_money_commands_before_any_sync_report_zeros_and_exit_0(live_simulator, tmp_path):
    env = live_simulator.env
    books_ = subprocess.run([*CLI, "books"], env=env, capture_output=True, text=True)
    assert books_.returncode == 0, books_.stdout + books_.stderr
    assert "residual" in books_.stdout and "$0.00" in books_.stdout
    pnl = subprocess.run(
        [*CLI, "pnl", "--csv", str(tmp_path / "lots.csv")], env=env, capture_output=True, text=True
    )
    assert pnl.returncode == 0, pnl.stderr
    assert "realized         $0.00" in pnl.stdout
    assert len((tmp_path / "lots.csv").read_text().splitlines()) == 1  # the header
    page = tmp_path / "r.html"
    report = subprocess.run([*CLI, "report", "-o", str(page)], env=env, capture_output=True)
    assert report.returncode == 0 and page.is_file()
