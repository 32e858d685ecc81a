"""`verify`: compare the tables with the complete listing, and repair."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from etl.config import Settings
from etl.errors import ApiStatusError

if TYPE_CHECKING:
    from etl.db.compare import Comparison
    from etl.sync.verify import VerifyResult

from etl.cli.wiring import (
    Commands,
    explain_auth,
    number,
    open_accounts,
)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from etl.sync.verify import verify_orders

    accounts, clients, engine = open_accounts(settings, args)
    differing = 0
    for account, client in zip(accounts, clients, strict=True):
        with client:
            try:
                result = verify_orders(
                    engine, client, account=account.name, repair=args.repair, examples=args.examples
                )
            except ApiStatusError as exc:
                raise explain_auth(exc, account, settings) from exc
        for line in verify_lines(result):
            print(line)
        differing += not result.equal
    return 1 if differing else 0


_KIND_TEXT = {
    "missing": "missing (listed, not in orders)",
    "stale": "stale (orders holds an older version)",
    "extra": "extra (in orders, not listed)",
    "unrecorded": "malformed records not in rejected_records",
}


def verify_lines(result: VerifyResult) -> list[str]:
    """The report of ``kalshi-etl verify`` for one account."""
    before = result.before
    lines = [
        f"verify {result.account}: the API lists {before.listed} orders"
        + (f" and {before.listed_rejected} malformed records" if before.listed_rejected else "")
        + f"; orders holds {before.stored} for this account"
    ]

    def describe(comparison: Comparison, indent: str) -> None:
        for kind, text in _KIND_TEXT.items():
            n = comparison.counts[kind]
            if n:
                ids = comparison.examples[kind]
                more = f" and {n - len(ids)} more" if n > len(ids) else ""
                lines.append(f"{indent}{n} {text}: {', '.join(ids)}{more}")

    describe(before, "  ")
    if result.repaired is not None:
        r = result.repaired
        lines.append(
            f"  repaired: inserted {r.inserted}, updated {r.updated}, unchanged {r.unchanged}, "
            f"rejected records written {r.rejected}"
        )
        if result.after is not None:
            describe(result.after, "  after the repair, ")
    if result.equal:
        lines.append(
            "  equal: every listed order is in orders, up to date"
            + (" (after the repair)" if result.repaired is not None else "")
        )
    else:
        lines.append("  DIFFERENT" + ("" if result.repaired else " (--repair writes what differs)"))
    return lines


def register(commands: Commands) -> None:
    """Add this module's commands to the parser."""
    p = commands.add_for_accounts(
        "verify",
        cmd_verify,
        "compare orders with the complete listing of the API (both tiers); exit 1 on a difference",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="write the API's version of every missing or stale order",
    )
    commands.allow_simulated(p)
    p.add_argument(
        "--examples",
        type=number(int, 0, 10_000),
        default=5,
        help="order ids listed per kind of difference (default 5)",
    )
