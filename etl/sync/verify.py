"""``verify``: prove that ``orders`` holds every order of an account, as the API has it now.

It reads the complete listing (every page of the live tier, then of the historical tier where
the server has one), parses each record as a sync would, and compares (:mod:`etl.db.compare`):
missing, stale and extra orders, and malformed records missing from ``rejected_records``.
With ``repair``, it then writes the listed version of every missing or stale order and records
the unrecorded rejections, under the account's orders lock, as a ``reconcile`` run; and
compares again.

On an exchange that keeps trading, a listing is a moving picture: an order that changed
after its page was read shows as stale or missing until the next sync. Extras are judged
only among orders first stored before the listing began.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import Connection, Engine

from etl.db import listed
from etl.db.compare import (
    Comparison,
    add_to_listing,
    compare,
    end_listing,
    listed_versions,
    start_listing,
    unrecorded_rejects,
)
from etl.db.engine import connection
from etl.db.listed import FillCheck, RowComparison
from etl.db.state import add_to_run, known_subaccounts
from etl.db.upsert import Counts, insert_rejected, upsert_orders
from etl.db.write import write_rows
from etl.kalshi.client import KalshiClient, Page
from etl.kalshi.parse import Order, Rejected, parse_order
from etl.streams import Listing
from etl.sync.listing import parser, rows_of, window_listings, window_pages, windowed
from etl.sync.orders import STREAM, HistoricalOrders
from etl.sync.partitions import Tier, Window, first_load_plan, list_windows
from etl.sync.run import recorded_run, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyResult:
    """The comparison, and with a repair what it wrote and the comparison after it."""

    account: str
    before: Comparison
    repaired: Counts | None = None
    after: Comparison | None = None

    @property
    def equal(self) -> bool:
        return (self.after or self.before).equal


def verify_orders(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    repair: bool = False,
    examples: int = 5,
    lock_wait: float = 30.0,
    on_page: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Compare the complete listing of ``account`` with ``orders``; repair on ask.

    ``on_page`` is called with the number of records read so far, after each page.

    Raises:
        ApiError: the listing failed after retries (nothing was written).
        LockBusyError: ``repair`` could not get the account's orders lock in ``lock_wait``.
    """
    started = utcnow()
    with connection(engine) as conn:  # one session: the listing tables are temporary
        start_listing(conn)
        conn.commit()
        read = 0
        lock = threading.Lock()  # one session: the windows' pages are added one at a time
        has_history = client.historical_cutoff() is not None
        history = HistoricalOrders.of_account(conn, client, account)

        def take(pages: Iterable[Page]) -> Counts:
            nonlocal read
            for page in pages:
                parsed = [parse_order(item, screened=page.screened) for item in page.items]
                good = [p for p in parsed if isinstance(p, Order)]
                history.add(o.subaccount_number for o in good if o.subaccount_number is not None)
                with lock:
                    add_to_listing(conn, good, [p for p in parsed if isinstance(p, Rejected)])
                    conn.commit()
                    read += len(page.items)
                    if on_page is not None:
                        on_page(read)
            return Counts()

        def tiers(win: Window) -> list[Tier]:
            found = [
                Tier(lambda: client.iter_order_pages(min_ts=win.min_ts, max_ts=win.max_ts), take)
            ]
            if has_history:
                found.append(
                    Tier(lambda: history.pages(min_ts=win.min_ts, max_ts=win.max_ts), take)
                )
            return found

        list_windows(client, first_load_plan(started), tiers, clock=utcnow)
        before = compare(conn, account=account, started=started, examples=examples)
        log.info(
            "verify %s: listed %d orders and %d malformed records; orders holds %d",
            account,
            before.listed,
            before.listed_rejected,
            before.stored,
        )
        result = VerifyResult(account, before)
        if repair and not before.equal:
            repaired = _repair(engine, conn, account, lock_wait)
            after = compare(conn, account=account, started=started, examples=examples)
            result = VerifyResult(account, before, repaired, after)
        end_listing(conn)
        conn.commit()
    return result


def _repair(engine: Engine, conn: Connection, account: str, lock_wait: float) -> Counts:
    """Write the listed version of every missing or stale order, and every unrecorded
    rejection, in a ``reconcile`` run of the account's orders stream."""
    total = Counts()
    with recorded_run(engine, account, STREAM, "reconcile", lock_wait=lock_wait) as run:
        for raws in listed_versions(conn, account=account):
            orders = [o for o in map(parse_order, raws) if isinstance(o, Order)]
            with run.transaction() as tx:
                counts = upsert_orders(tx, orders, account=account, synced_at=utcnow(), claim=True)
                add_to_run(tx, run.run_id, counts)
            total += counts
        bad = unrecorded_rejects(conn)
        if bad:
            with run.transaction() as tx:
                written = insert_rejected(
                    tx, bad, stream=STREAM, account=account, received_at=utcnow()
                )
                counts = Counts(fetched=written, rejected=written)
                add_to_run(tx, run.run_id, counts)
            total += counts
    return total


@dataclass(frozen=True)
class ListingVerifyResult:
    """``verify`` of one listing stream: the comparison, the repair and the comparison after
    it, and for fills the cross-check against their orders."""

    account: str
    stream: str
    before: RowComparison
    repaired: Counts | None = None
    after: RowComparison | None = None
    fills_check: FillCheck | None = None

    @property
    def equal(self) -> bool:
        short = self.fills_check is not None and self.fills_check.missing_fills > 0
        return (self.after or self.before).equal and not short


def verify_listing(
    engine: Engine,
    client: KalshiClient,
    stream: Listing,
    *,
    account: str,
    repair: bool = False,
    examples: int = 5,
    lock_wait: float = 30.0,
    lookback: timedelta = timedelta(minutes=5),
) -> ListingVerifyResult:
    """Compare the complete listing of ``stream`` (every partition, both tiers) with its
    table; repair on ask (the API's version, even where the rule is "insert once").

    Raises:
        ApiError: the listing failed after retries (nothing was written).
        LockBusyError: ``repair`` could not get the stream's lock in ``lock_wait``.
    """
    rule = stream.rule
    started = utcnow()
    with connection(engine) as conn:  # one session: the listing table is temporary
        listed.start(conn)
        conn.commit()
        partitions: list[int | None] = [None]
        if stream.per_subaccount:
            subs = known_subaccounts(conn, account) | client.subaccount_numbers()
            partitions = [*sorted(subs)]
        lock = threading.Lock()  # one session: pages read at once are added one at a time

        def take(page: Page, parse: Callable[..., Any]) -> None:
            parsed = [parse(item, screened=page.screened) for item in page.items]
            good = [p for p in parsed if not isinstance(p, Rejected)]
            with lock:
                listed.add(conn, [(listed.record_key(r, rule.key), r.raw) for r in good])
                conn.commit()

        if windowed(stream):  # a listing of the whole account by time: read in windows
            parse = parser(stream)

            def take_all(pages: Iterable[Page]) -> Counts:
                for page in pages:
                    take(page, parse)
                return Counts()

            listings = window_listings(client, stream)

            def tiers(win: Window) -> list[Tier]:
                return [
                    Tier(functools.partial(window_pages, client, stream, path, win), take_all)
                    for path, _ in listings(win)
                ]

            list_windows(client, first_load_plan(started), tiers, clock=utcnow)
            partitions = []
        for subaccount in partitions:
            for listing in _same_table(stream):
                parse = parser(listing, subaccount=subaccount)
                assert listing.items_key is not None
                for path in filter(None, (listing.path, listing.historical_path)):
                    for page in client.iter_pages(
                        path, listing.items_key, subaccount=subaccount, **dict(listing.filters)
                    ):
                        take(page, parse)

        def comparison() -> RowComparison:
            return listed.compare(
                conn,
                rule.table,
                rule.key,
                stream=stream.name,
                account=account,
                started=started,
                examples=examples,
                extras=not stream.forgotten,
            )

        before = comparison()
        result = ListingVerifyResult(account, stream.name, before)
        if repair and not before.equal:
            repaired = _repair_listing(engine, conn, stream, account, lock_wait)
            result = ListingVerifyResult(account, stream.name, before, repaired, comparison())
        # The cross-check means something only where the server lists fills at all.
        if stream.name == "fills" and client.serves(stream.path):
            check = listed.check_fills_against_orders(
                conn, account=account, settled_before=started - lookback, examples=examples
            )
            result = replace(result, fills_check=check)
        listed.end(conn)
        conn.commit()
    return result


def _same_table(stream: Listing) -> list[Listing]:
    """The listings of ``stream`` that fill its table (not archived positions, say)."""
    return [x for x in stream.listings if x.rule.table is stream.rule.table]


def _repair_listing(
    engine: Engine, conn: Connection, stream: Listing, account: str, lock_wait: float
) -> Counts:
    """Write the listed version of every missing or stale record in a ``reconcile`` run."""
    rule = stream.rule
    total = Counts()
    with recorded_run(engine, account, stream.name, "reconcile", lock_wait=lock_wait) as run:
        for keyed in listed.differing(conn, rule.table, rule.key, account=account):
            records = []
            for key, raw in keyed:
                # A per-subaccount record's key starts with its subaccount (its payload has none).
                subaccount = int(key.split("/", 1)[0]) if stream.per_subaccount else None
                # The listing it came from is the one whose parse gives it that key (a cash
                # movement's kind is its listing's).
                for listing in _same_table(stream):
                    parsed = parser(listing, subaccount=subaccount)(raw, screened=False)
                    if not isinstance(parsed, Rejected) and (
                        listed.record_key(parsed, rule.key) == key
                    ):
                        records.append(parsed)
                        break
            rows = rows_of(stream, account, records)
            with run.transaction() as tx:
                counts = write_rows(tx, rule, rows, synced_at=utcnow(), claim=True)
                add_to_run(tx, run.run_id, counts)
            total += counts
    return total
