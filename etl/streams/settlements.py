"""``settlements``: what each market paid, per subaccount. Live only: the API forgets a
settlement once its event is archived, so every run reads the whole listing of every
subaccount, and a row no longer listed is kept (never "extra", never deleted)."""

from __future__ import annotations

from datetime import timedelta

from etl.db.models import settlements
from etl.db.write import NewestWins
from etl.kalshi.parse import SETTLEMENT_COLUMNS, parse_settlement
from etl.streams import Listing

SETTLEMENTS = Listing(
    name="settlements",
    path="portfolio/settlements",
    items_key="settlements",
    parse=parse_settlement,
    columns=SETTLEMENT_COLUMNS,
    rule=NewestWins(
        settlements, ("account", "subaccount_number", "ticker"), "settled_time", marks=True
    ),
    every=timedelta(minutes=10),
    noun="settlements",
    per_subaccount=True,
    incremental=False,
    forgotten=True,
)
