"""``kalshi-etl report``: one self-contained HTML page of an account's money.

Every figure on the page is read from the views and tables (``pnl_by_market``, ``pnl_daily``,
``balance_snapshots``, ``positions_current``, ``queue_positions_current``), never recomputed:
the page says what SQL says. The charts are plotly figures; plotly.js is inlined once, so the
page works offline (no CDN).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import plotly.graph_objects as go
import sqlalchemy as sa
from plotly.offline import get_plotlyjs
from sqlalchemy.engine import Connection

from etl.money.books import dollars

ZERO = Decimal(0)
TOP_MARKETS = 20


@dataclass(frozen=True)
class Headline:
    realized: Decimal
    fees: Decimal
    markets_won: int
    markets_closed: int
    contracts: Decimal
    balance: Decimal | None

    @property
    def win_rate(self) -> str:
        if not self.markets_closed:
            return "n/a"
        return f"{self.markets_won / self.markets_closed:.0%}"


def headline(conn: Connection, account: str) -> Headline:
    row = conn.execute(
        sa.text(
            """
            SELECT coalesce(sum(realized_pnl_dollars), 0), coalesce(sum(fees_dollars), 0),
                   count(*) FILTER (WHERE realized_pnl_dollars > 0
                                    AND (open_position_fp = 0 OR market_result IS NOT NULL)),
                   count(*) FILTER (WHERE open_position_fp = 0 OR market_result IS NOT NULL),
                   coalesce(sum(contracts_traded_fp), 0)
            FROM pnl_by_market WHERE account = :account
            """
        ),
        {"account": account},
    ).one()
    balance = conn.execute(
        sa.text(
            "SELECT sum(balance_dollars) FROM (SELECT DISTINCT ON (subaccount_number) "
            "balance_dollars FROM balance_snapshots WHERE account = :account "
            "ORDER BY subaccount_number, captured_at DESC) latest"
        ),
        {"account": account},
    ).scalar_one()
    return Headline(row[0], row[1], row[2], row[3], row[4], balance)


def _rows(conn: Connection, sql: str, **params: Any) -> list[sa.Row[Any]]:
    return list(conn.execute(sa.text(sql), params).all())


def _figure(fig: go.Figure, title: str, *, height: int = 360) -> str:
    fig.update_layout(
        title=title,
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
    )
    return str(fig.to_html(full_html=False, include_plotlyjs=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> str:
    if not rows:
        return f"<p class='empty'>{html.escape(empty)}</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M UTC")
    if isinstance(value, Decimal):
        return f"{value:,.2f}"
    return str(value)


def render(conn: Connection, account: str, *, since: datetime | None = None) -> str:
    """The page for ``account`` (time series from ``since`` on)."""
    h = headline(conn, account)
    after = "(CAST(:since AS timestamptz) IS NULL OR {col} >= :since)"
    daily = _rows(
        conn,
        "SELECT d.day, d.realized_pnl_dollars, d.fees_dollars, d.cumulative_realized_pnl_dollars, "
        "(SELECT count(*) FROM fills f WHERE f.account = d.account "
        " AND (f.created_time AT TIME ZONE 'UTC')::date = d.day) AS fills "
        "FROM pnl_daily d WHERE d.account = :account AND "
        + after.format(col="d.day")
        + " ORDER BY d.day",
        account=account,
        since=since,
    )
    balances = _rows(
        conn,
        "SELECT date_trunc('second', captured_at) AS captured_at, subaccount_number, "
        "balance_dollars FROM balance_snapshots WHERE account = :account ORDER BY captured_at",
        account=account,
    )
    by_market = _rows(
        conn,
        "SELECT CASE WHEN subaccount_number = 0 THEN ticker "
        "ELSE ticker || ' (sub ' || subaccount_number || ')' END AS ticker, event_ticker, "
        "realized_pnl_dollars, fees_dollars, contracts_traded_fp, market_result "
        "FROM pnl_by_market WHERE account = :account "
        "ORDER BY abs(realized_pnl_dollars) DESC, ticker",
        account=account,
    )
    by_series = _rows(
        conn,
        "SELECT split_part(ticker, '-', 1) AS series, sum(realized_pnl_dollars) AS pnl, "
        "sum(fees_dollars) AS fees FROM pnl_by_market WHERE account = :account "
        "GROUP BY 1 ORDER BY 2 DESC",
        account=account,
    )
    positions = _rows(
        conn,
        "SELECT p.subaccount_number, p.ticker, p.position_fp, p.market_exposure_dollars, "
        "p.realized_pnl_dollars, p.captured_at FROM positions_current p "
        "WHERE p.account = :account ORDER BY abs(p.market_exposure_dollars) DESC NULLS LAST",
        account=account,
    )
    queue = _rows(
        conn,
        "SELECT ticker, order_id, outcome_side, book_side, yes_price_dollars, remaining_count_fp, "
        "queue_position, captured_at FROM queue_positions_current WHERE account = :account "
        "ORDER BY ticker, queue_position NULLS LAST LIMIT 200",
        account=account,
    )

    charts = []
    days = [r.day for r in daily]
    charts.append(
        _figure(
            go.Figure(go.Scatter(x=days, y=[r.cumulative_realized_pnl_dollars for r in daily])),
            "Cumulative realized P&L (after fees, $)",
        )
    )
    charts.append(_figure(_balance_figure(balances, since), "Balance, every subaccount ($)"))
    charts.append(
        _figure(
            go.Figure(
                go.Bar(x=[r.series for r in by_series], y=[r.pnl for r in by_series], name="P&L")
            ),
            "Realized P&L by series ($)",
        )
    )
    top = by_market[:TOP_MARKETS]
    charts.append(
        _figure(
            go.Figure(
                go.Bar(
                    y=[r.ticker for r in reversed(top)],
                    x=[r.realized_pnl_dollars for r in reversed(top)],
                    orientation="h",
                )
            ),
            f"Realized P&L by market (the {len(top)} largest, $)",
            height=max(360, 26 * len(top) + 100),
        )
    )
    fees = go.Figure()
    fees.add_trace(go.Bar(x=days, y=[r.fees_dollars for r in daily], name="fees ($)"))
    fees.add_trace(go.Scatter(x=days, y=[r.fills for r in daily], name="fills", yaxis="y2"))
    fees.update_layout(yaxis2={"overlaying": "y", "side": "right", "title": "fills"})
    charts.append(_figure(fees, "Fees and fills per day"))

    cards = [
        ("Realized P&L", dollars(h.realized)),
        ("Fees", dollars(h.fees)),
        ("Win rate", f"{h.win_rate} of {h.markets_closed} closed markets"),
        ("Volume", f"{h.contracts:,.0f} contracts"),
        ("Balance", dollars(h.balance)),
    ]
    return PAGE.format(
        title=html.escape(f"kalshi-etl report: {account}"),
        plotly=get_plotlyjs(),
        cards="".join(
            f"<div class='card'><div class='label'>{html.escape(k)}</div>"
            f"<div class='value'>{html.escape(v)}</div></div>"
            for k, v in cards
        ),
        charts="".join(f"<section>{c}</section>" for c in charts),
        positions=_table(
            ["subaccount", "market", "position", "exposure $", "realized $", "as of"],
            positions,
            "no open position",
        ),
        queue=_table(
            ["market", "order", "outcome", "book", "YES price", "remaining", "queue", "as of"],
            queue,
            "no open order",
        ),
        markets=_table(
            ["market", "event", "realized $", "fees $", "contracts", "result"],
            by_market[:100],
            "no market traded",
        ),
    )


def _balance_figure(rows: Sequence[sa.Row[Any]], since: datetime | None) -> go.Figure:
    """The total over every subaccount after each poll that saw a change (each subaccount's
    latest row; the rows of one poll, within its second, count together)."""
    latest: dict[int, Decimal] = {}
    totals: dict[datetime, Decimal] = {}
    for row in rows:
        latest[row.subaccount_number] = row.balance_dollars or ZERO
        if since is None or row.captured_at >= since:
            totals[row.captured_at] = sum(latest.values(), ZERO)
    return go.Figure(
        go.Scatter(x=list(totals), y=list(totals.values()), mode="lines+markers", line_shape="hv")
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.1rem; margin-top: 2rem; }}
.cards {{ display: flex; gap: 1rem; flex-wrap: wrap; }}
.card {{ border: 1px solid #ddd; border-radius: 8px; padding: .8rem 1.2rem; min-width: 150px; }}
.label {{ font-size: .8rem; color: #666; }} .value {{ font-size: 1.3rem; font-weight: 600; }}
table {{ border-collapse: collapse; width: 100%; font-size: .85rem; }}
th, td {{ border-bottom: 1px solid #eee; padding: .3rem .5rem; text-align: left; }}
.empty {{ color: #888; }}
</style>
<script>{plotly}</script>
</head><body>
<h1>{title}</h1>
<div class="cards">{cards}</div>
{charts}
<h2>Open positions</h2>{positions}
<h2>Queue positions of open orders</h2>{queue}
<h2>Markets</h2>{markets}
<p class="empty">Figures from pnl_by_market, pnl_daily, balance_snapshots, positions_current
and queue_positions_current (FIFO lots; realized P&amp;L after fees unless said).</p>
</body></html>
"""
