"""``cash``: deposits, withdrawals and subaccount transfers in ``cash_movements``, each listing
stamping its kind; the newest version fetched wins (a status can change)."""

from __future__ import annotations

import functools
from datetime import timedelta

from etl.db.models import cash_movements
from etl.db.write import NewestWins
from etl.kalshi.parse.account import CASH_COLUMNS, parse_cash
from etl.streams import Listing


def _cash(kind: str, path: str, items_key: str, *also: Listing) -> Listing:
    return Listing(
        name="cash",
        path=path,
        items_key=items_key,
        parse=functools.partial(parse_cash, kind=kind),
        columns=CASH_COLUMNS,
        rule=NewestWins(cash_movements, ("account", "kind", "id")),
        every=timedelta(hours=1),
        noun=f"{kind}s",
        incremental=False,
        also=also,
    )


CASH = _cash(
    "deposit",
    "portfolio/deposits",
    "deposits",
    _cash("withdrawal", "portfolio/withdrawals", "withdrawals"),
    _cash("transfer", "portfolio/subaccounts/transfers", "transfers"),
)
