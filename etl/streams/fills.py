"""``fills``: every fill of the account, both tiers; a fill never changes."""

from __future__ import annotations

from datetime import timedelta

from etl.db.models import fills
from etl.db.write import InsertOnce
from etl.kalshi.parse import FILL_COLUMNS, parse_fill
from etl.streams import Listing

FILLS = Listing(
    name="fills",
    path="portfolio/fills",
    items_key="fills",
    parse=parse_fill,
    columns=FILL_COLUMNS,
    # A replay writes nothing; the REST version replaces one only the `fill` channel sent.
    rule=InsertOnce(fills, ("fill_id",), stream_marker="ts_ms", marks=True),
    every=timedelta(seconds=30),
    noun="fills",
    historical_path="historical/fills",
    cutoff_field="trades_created_ts",
)
