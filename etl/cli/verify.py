"""`verify`: compare the tables with the complete listing, and repair."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from etl.config import Settings
from etl.errors import ApiStatusError

if TYPE_CHECKING:
    from etl.db.compare import Comparison
    from etl.db.listed import RowComparison
    from etl.sync.verify import ListingVerifyResult, VerifyResult

from etl.cli.wiring import (
    Commands,
    chosen_streams,
    explain_auth,
    number,
    open_accounts,
)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from etl.streams.registry import LISTINGS
    from etl.sync.verify import verify_listing, verify_orders

    accounts, clients, engine = open_accounts(settings, args)
    # Every stream that has a listing to compare with (queue positions have none).
    streams = [
        s for s in chosen_streams(args) if s == "orders" or (s in LISTINGS and LISTINGS[s].verified)
    ]
    differing = 0
    for account, client in zip(accounts, clients, strict=True):
        with client:
            try:
                for stream in streams:
                    if stream == "orders":
                        orders_result = verify_orders(
                            engine,
                            client,
                            account=account.name,
                            repair=args.repair,
                            examples=args.examples,
                        )
                        lines, equal = verify_lines(orders_result), orders_result.equal
                    else:
                        listing_result = verify_listing(
                            engine,
                            client,
                            LISTINGS[stream],
                            account=account.name,
                            repair=args.repair,
                            examples=args.examples,
                            lookback=settings.lookback,
                        )
                        lines, equal = listing_lines(listing_result), listing_result.equal
                    for line in lines:
                        print(line)
                    differing += not equal
            except ApiStatusError as exc:
                raise explain_auth(exc, account, settings) from exc
        if {"fills", "settlements"} & set(streams):
            for line in money_lines(engine, account.name, args.examples):
                print(line)
    return 1 if differing else 0


def money_lines(engine: Engine, account: str, examples: int) -> list[str]:
    """Our P&L against Kalshi's own figures (reported; the exit code is the listings')."""
    from etl.db.engine import connection
    from etl.money.checks import check_money
    from etl.money.lots import rebuild_marked

    rebuild_marked(engine, account)
    with connection(engine) as conn:
        check = check_money(conn, account, examples=examples)
    lines = [f"P&L of account {account} against Kalshi's own figures (reported only)"]
    lines.append(
        f"  positions   {check.markets_compared} markets compared, "
        f"{check.markets_differing} differ both before and after fees"
    )
    lines += [f"    {example}" for example in check.market_examples]
    lines.append(
        f"  settlements {check.settlements_compared} compared with the lots they closed, "
        f"{check.settlements_differing} differ"
    )
    lines += [f"    {example}" for example in check.settlement_examples]
    return lines


def difference_lines(
    counts: dict[str, int], examples: dict[str, list[str]], texts: dict[str, str], indent: str
) -> list[str]:
    """One line per kind of difference found: how many, what it means, a few keys."""
    lines = []
    for kind, text in texts.items():
        n = counts[kind]
        if n:
            keys = examples[kind]
            more = f" and {n - len(keys)} more" if n > len(keys) else ""
            lines.append(f"{indent}{n} {text}: {', '.join(keys)}{more}")
    return lines


def listing_lines(result: ListingVerifyResult) -> list[str]:
    """The report of ``kalshi-etl verify`` for one listing stream of one account."""
    stream, before = result.stream, result.before
    lines = [
        f"verify {result.account} {stream}: the API lists {before.listed}; {stream} holds "
        f"{before.stored} for this account"
    ]
    texts = {
        "missing": f"missing (listed, not in {stream})",
        "stale": f"stale ({stream} holds another version)",
        "extra": f"extra (in {stream}, not listed)",
    }

    def describe(comparison: RowComparison, indent: str) -> None:
        lines.extend(difference_lines(comparison.counts, comparison.examples, texts, indent))

    describe(before, "  ")
    if result.repaired is not None:
        r = result.repaired
        lines.append(f"  repaired: inserted {r.inserted}, updated {r.updated}")
        if result.after is not None:
            describe(result.after, "  after the repair, ")
    check = result.fills_check
    if check is not None and check.missing_fills:
        lines.append(
            f"  {check.missing_fills} closed orders whose fills do not add up to their fill "
            f"count (missing fills): {', '.join(check.examples)}"
        )
    if check is not None and check.fee_differences:
        lines.append(
            f"  note: {check.fee_differences} orders whose fills' fees differ from the "
            f"order's by more than $0.01 (rebates, rounding): {', '.join(check.fee_examples)}"
        )
    lines.append("  equal" if result.equal else "  DIFFERENT")
    return lines


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
        lines.extend(difference_lines(comparison.counts, comparison.examples, _KIND_TEXT, indent))

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
        "compare orders, fills and settlements with the complete listings of the API (both "
        "tiers); exit 1 on a difference",
    )
    commands.streams(p)
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
