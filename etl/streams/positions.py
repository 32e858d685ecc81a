"""``positions``: per subaccount, a snapshot when a market's position is first seen or changes
(``settlement_status=all``, so settled markets stay listed); a market no longer listed gets one
row with ``position_fp`` 0. Archived events' positions go to ``archived_positions``."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from etl.db.models import archived_positions, position_snapshots
from etl.db.write import ChangeOnly, NewestWins
from etl.kalshi.parse.account import POSITION_COLUMNS, parse_position
from etl.streams import Listing

ARCHIVED_POSITIONS = Listing(
    name="positions",
    path="historical/positions",
    items_key="market_positions",
    parse=parse_position,
    columns=POSITION_COLUMNS,
    rule=NewestWins(archived_positions, ("account", "subaccount_number", "ticker"), None),
    every=timedelta(minutes=1),
    noun="archived positions",
    per_subaccount=True,
    incremental=False,
)

POSITIONS = Listing(
    name="positions",
    path="portfolio/positions",
    items_key="market_positions",
    parse=parse_position,
    columns=POSITION_COLUMNS,
    rule=ChangeOnly(
        position_snapshots,
        series=("account", "subaccount_number", "ticker"),
        compared=tuple(
            c for c in POSITION_COLUMNS if c not in ("subaccount_number", "ticker", "raw")
        ),
        closed=(("position_fp", Decimal(0)), ("market_exposure_dollars", Decimal(0))),
    ),
    every=timedelta(minutes=1),
    noun="positions",
    per_subaccount=True,
    incremental=False,
    filters=(("settlement_status", "all"),),
    also=(ARCHIVED_POSITIONS,),
    verified=False,
)
