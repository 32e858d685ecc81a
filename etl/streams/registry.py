"""Every stream by name: the contract's names, and the listing declarations behind them."""

from __future__ import annotations

from typing import Final

from etl.streams import Listing
from etl.streams.balance import BALANCE
from etl.streams.cash import CASH
from etl.streams.fills import FILLS
from etl.streams.positions import POSITIONS
from etl.streams.settlements import SETTLEMENTS

# The contract's stream names, in the order a pass runs them.
NAMES: Final = ("orders", "queue_positions", "fills", "settlements", "positions", "balance", "cash")
# The listing streams this release syncs (orders and queue positions have cycles of their own).
LISTINGS: Final[dict[str, Listing]] = {
    s.name: s for s in (FILLS, SETTLEMENTS, POSITIONS, BALANCE, CASH)
}
# What a pass covers by default: every stream this release syncs.
AVAILABLE: Final = ("orders", "queue_positions", *LISTINGS)
# The WebSocket channel of each stream that has one (`daemon --realtime`).
CHANNEL_OF: Final = {"orders": "user_orders", "fills": "fill", "positions": "market_positions"}
