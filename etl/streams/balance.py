"""``balance``: per subaccount, a snapshot when the balance is first seen or changes
(``balance_dollars``, never the truncated cents; the per-exchange breakdown kept in ``raw``)."""

from __future__ import annotations

from datetime import timedelta

from etl.db.models import balance_snapshots
from etl.db.write import ChangeOnly
from etl.kalshi.parse.account import BALANCE_COLUMNS, parse_balance
from etl.streams import Listing

BALANCE = Listing(
    name="balance",
    path="portfolio/balance",
    items_key=None,  # one object per subaccount
    parse=parse_balance,
    columns=BALANCE_COLUMNS,
    rule=ChangeOnly(
        balance_snapshots,
        series=("account", "subaccount_number"),
        compared=("balance_dollars", "portfolio_value_dollars", "updated_ts"),
    ),
    every=timedelta(minutes=1),
    noun="balance",
    per_subaccount=True,
    incremental=False,
    verified=False,
)
