"""`pnl`, `books` and `report`: the money, from the tables alone (no API call).

Each first rebuilds the lots of the markets marked since the last rebuild, so what they print
is current with the fills and settlements stored.
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.cli.ops import _known_account
from etl.cli.wiring import EXIT_UNHEALTHY, Commands, number, open_engine
from etl.config import Settings, parse_time
from etl.db import migrations
from etl.db.engine import connection
from etl.errors import ConfigError
from etl.money.books import dollars, unsettled_markets

# Kalshi's tax export, in KALSHI.md's order (then ours).
CSV_COLUMNS = (
    "type",
    "quantity_fp",
    "market_ticker",
    "side",
    "entry_price_dollars",
    "exit_price_dollars",
    "open_fees_dollars",
    "close_fees_dollars",
    "realized_pnl_without_fees_dollars",
    "realized_pnl_with_fees_dollars",
    "close_timestamp",
    "open_timestamp",
    "account",
    "subaccount_number",
)
TOP = 5


def _accounts(settings: Settings, engine: Engine, name: str | None) -> list[str]:
    """``--account NAME`` (checked), else every account with money data (else the configured
    ones)."""
    if migrations.current_revision(engine) != migrations.head_revision():
        raise ConfigError("the schema is not current: run kalshi-etl migrate first")
    if name is not None:
        _known_account(settings, engine, name)
        return [name]
    with connection(engine) as conn:
        names = list(
            conn.execute(
                sa.text(
                    "SELECT account FROM fills UNION SELECT account FROM balance_snapshots "
                    "UNION SELECT account FROM settlements ORDER BY 1"
                )
            ).scalars()
        )
    if not names:  # nothing synced yet: the configured accounts, whose money is all zero
        names = [a.name for a in settings.accounts()]
    if not names:
        raise ConfigError(
            "no account has fills, settlements or a balance yet, and none is configured: "
            "run kalshi-etl sync"
        )
    return names


def _rebuild(engine: Engine, accounts: list[str]) -> None:
    from etl.money.lots import rebuild_marked

    for account in accounts:
        rebuild_marked(engine, account)


def _zone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"--tz {name}: not a time zone (e.g. UTC, America/New_York)") from None


def cmd_pnl(args: argparse.Namespace, settings: Settings) -> int:
    engine = open_engine(settings)
    zone = _zone(args.tz)
    accounts = _accounts(settings, engine, args.account)
    _rebuild(engine, accounts)
    span: tuple[datetime, datetime] | None = None
    if args.year is not None:
        span = (datetime(args.year, 1, 1, tzinfo=zone), datetime(args.year + 1, 1, 1, tzinfo=zone))
    with connection(engine) as conn:
        if args.csv is not None:
            written = _write_csv(conn, Path(args.csv), accounts, span, zone)
            print(f"wrote {written} closed lots to {args.csv}", file=sys.stderr)
        for account in accounts:
            for line in _pnl_lines(conn, account, span, args.year):
                print(line)
    return 0


def _closed_lots(accounts: list[str], span: tuple[datetime, datetime] | None) -> sa.TextClause:
    return sa.text(
        """
        SELECT close_type, quantity_fp, ticker, side, entry_price_dollars, exit_price_dollars,
               open_fees_dollars, close_fees_dollars, realized_pnl_without_fees_dollars,
               realized_pnl_with_fees_dollars, close_time, open_time, account, subaccount_number
        FROM pnl_lots
        WHERE account = ANY(:accounts) AND close_time IS NOT NULL
          AND (CAST(:start AS timestamptz) IS NULL OR close_time >= :start)
          AND (CAST(:end AS timestamptz) IS NULL OR close_time < :end)
        ORDER BY account, close_time, subaccount_number, ticker, lot_number
        """
    ).bindparams(accounts=accounts, start=span[0] if span else None, end=span[1] if span else None)


def _write_csv(
    conn: sa.Connection,
    path: Path,
    accounts: list[str],
    span: tuple[datetime, datetime] | None,
    zone: tzinfo,
) -> int:
    rows = conn.execute(_closed_lots(accounts, span)).all()
    try:
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                cells = list(row)
                cells[10] = row.close_time.astimezone(zone).isoformat()
                cells[11] = row.open_time.astimezone(zone).isoformat() if row.open_time else ""
                writer.writerow(cells)
    except OSError as exc:
        raise ConfigError(f"--csv {path}: cannot write it: {exc.strerror or exc}") from None
    return len(rows)


def _pnl_lines(
    conn: sa.Connection, account: str, span: tuple[datetime, datetime] | None, year: int | None
) -> list[str]:
    params = {
        "account": account,
        "start": span[0] if span else None,
        "end": span[1] if span else None,
    }
    window = (
        "(CAST(:start AS timestamptz) IS NULL OR close_time >= :start) "
        "AND (CAST(:end AS timestamptz) IS NULL OR close_time < :end)"
    )
    total = conn.execute(
        sa.text(
            f"""
            SELECT coalesce(sum(realized_pnl_with_fees_dollars), 0),
                   coalesce(sum(realized_pnl_without_fees_dollars), 0),
                   coalesce(sum(open_fees_dollars + close_fees_dollars), 0), count(*)
            FROM pnl_lots WHERE account = :account AND close_time IS NOT NULL AND {window}
            """
        ),
        params,
    ).one()
    markets = conn.execute(
        sa.text(
            f"""
            SELECT ticker, sum(realized_pnl_with_fees_dollars) AS pnl
            FROM pnl_lots WHERE account = :account AND close_time IS NOT NULL AND {window}
            GROUP BY ticker ORDER BY pnl DESC
            """
        ),
        params,
    ).all()
    unsettled = sorted({row.ticker for row in unsettled_markets(conn, account)})
    with_fees, before_fees, fees, lots = total
    won = sum(1 for m in markets if m.pnl > 0)
    when = f" in {year}" if year is not None else ""
    lines = [
        f"P&L of {account}{when} (FIFO lots, closed by trade or settlement)",
        f"  realized         {dollars(with_fees)} ({dollars(before_fees)} before fees)",
        f"  fees             {dollars(fees)} on {lots} closed lots",
        f"  win rate         {won}/{len(markets)} markets"
        + (f" ({won / len(markets):.0%})" if markets else ""),
    ]
    if markets:
        best = markets[:TOP]
        worst = [m for m in reversed(markets[-TOP:]) if m not in best]
        lines.append(
            "  best markets     " + ", ".join(f"{m.ticker} {dollars(m.pnl)}" for m in best)
        )
        if worst:
            lines.append(
                "  worst markets    " + ", ".join(f"{m.ticker} {dollars(m.pnl)}" for m in worst)
            )
    if unsettled:
        lines.append(
            f"  not settled here {len(unsettled)} markets closed or archived at Kalshi with no "
            f"settlement captured (their lots stay open): {', '.join(unsettled[:10])}"
        )
    return lines


def cmd_books(args: argparse.Namespace, settings: Settings) -> int:
    from etl.money.books import books, explain

    engine = open_engine(settings)
    since = parse_time(args.since, name="--since") if args.since else None
    accounts = _accounts(settings, engine, args.account)
    _rebuild(engine, accounts)
    code = 0
    with connection(engine) as conn:
        for account in accounts:
            b = books(conn, account, since=since)
            start = since.isoformat() if since else "the first movement"
            end = b.until.isoformat() if b.until else "no balance yet"
            print(f"books of {account}: {start} .. {end}")
            for label, value in (
                ("balance now", b.balance_now),
                ("balance then", b.balance_then),
                ("fill cash flows", b.fill_flows),
                ("fill fees", -b.fees),
                ("settlements", b.settlements),
                ("deposits", b.deposits),
                ("withdrawals", -b.withdrawals),
                ("movements", b.movements),
            ):
                print(f"  {label:<18}{dollars(value):>16}")
            print(f"  {'residual':<18}{dollars(b.residual):>16}")
            if abs(b.residual) <= args.tolerance:
                print(f"  balanced (within ${args.tolerance})")
                continue
            code = EXIT_UNHEALTHY
            print(f"  NOT BALANCED: {dollars(b.residual)} unexplained")
            gaps = explain(conn, account)
            for gap in gaps:
                print(f"    {gap.what}")
            if not gaps:
                print(
                    "    no missing fill or settlement found in the other tables: a deposit, "
                    "withdrawal or settlement the API no longer lists?"
                )
    return code


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from etl.money.report import render

    engine = open_engine(settings)
    since = parse_time(args.since, name="--since") if args.since else None
    accounts = _accounts(settings, engine, args.account)
    _rebuild(engine, accounts)
    target = Path(args.output)
    with connection(engine) as conn:
        for account in accounts:
            path = target
            if len(accounts) > 1:
                path = target.with_name(f"{target.stem}-{account}{target.suffix}")
            page = render(conn, account, since=since)
            try:
                path.write_text(page, encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"-o {path}: cannot write it: {exc.strerror or exc}") from None
            print(f"report of {account}: {path.resolve()}")
    return 0


def register(commands: Commands) -> None:
    """Add this module's commands to the parser."""
    p = commands.add_for_accounts(
        "pnl", cmd_pnl, "realized P&L from FIFO lots, and the lots as a tax CSV"
    )
    p.add_argument("--year", type=number(int, 2000, 2100), default=None, help="only this year")
    p.add_argument("--tz", default="UTC", help="time zone of --year and the CSV (default UTC)")
    p.add_argument("--csv", metavar="FILE", default=None, help="write the closed lots here")
    p = commands.add_for_accounts(
        "books", cmd_books, "the cash check: does the balance move exactly by the movements?"
    )
    p.add_argument("--since", default=None, help="from this time (default: the whole history)")
    p.add_argument(
        "--tolerance",
        type=Decimal,
        default=Decimal("0.01"),
        help="dollars of residual still called balanced (default 0.01)",
    )
    p = commands.add_for_accounts(
        "report", cmd_report, "one self-contained HTML page of the account's money"
    )
    p.add_argument("--since", default=None, help="time series from this time")
    p.add_argument(
        "-o", "--output", default="report.html", help="the page to write (default report.html)"
    )
