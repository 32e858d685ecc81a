"""Orders sync: pages → parse → upsert → state, one transaction per page.

A *pull* reads one filtered listing page by page; each page's orders and rejected records are
committed together with the run's counts. The watermark (or a backfill window's completion)
is written in one more transaction once the listing has been read to its end: the API's sort
order is unknown, so a half-read pull justifies nothing. A kill at any instant therefore loses
nothing, and a rerun converges.

No record can stop a stream: the parser rejects what PostgreSQL could not store, and a page
whose write still fails on its data is written again record by record, so that only the
records PostgreSQL refuses go to ``rejected_records``.

One cycle (:func:`sync_orders`):

1. first run of an account (no watermark): every live order, then every historical one (live
   first: orders only ever move live → historical, so nothing slips between the two);
   later runs: live orders with ``min_ts = watermark − lookback``, then the historical tier
   too when that reaches past its cutoff, read *after* the live pull so that orders which
   moved meanwhile are found;
2. every resting order (``status=resting``), whichever timestamp ``min_ts`` compares (not
   on the first run: its full listing holds them all);
3. settle (not on the first run either): each order the table holds as open but step 2 did
   not list is fetched by id (404 → looked up in the historical tier by its ticker and
   subaccount). An order that cannot be fetched is logged and recorded in
   ``rejected_records`` (once per distinct failure); the others still settle.

The first load of an account with no stored orders (a first sync, or a first backfill) COPYs
its pages straight into ``orders`` until a page meets an order already stored; from then on
pages are merged (see :class:`NewAccount`).

The new watermark is the server's ``user_data_timestamp`` taken *before* step 1 (the local
clock where the server has none, or where it is earlier): never past what the server has seen,
never backwards.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, Engine

from etl import metrics
from etl.db.engine import connection
from etl.db.state import (
    Scope,
    add_to_run,
    backfill_coverage,
    end_load,
    has_orders,
    mark_window_done,
    open_orders,
    open_subaccounts,
    read_state,
    start_load,
    write_state,
)
from etl.db.upsert import (
    Counts,
    copy_new_orders,
    insert_rejected,
    upsert_orders,
    write_records,
)
from etl.errors import ApiError, ApiProtocolError, ApiStatusError
from etl.kalshi.client import KalshiClient, Page
from etl.kalshi.parse import Order, Rejected, parse_order
from etl.sync import engine
from etl.sync.engine import Checkpoint, PageCallback, PageWriter, Sink, Write
from etl.sync.partitions import (
    ProgressCallback,
    Tier,
    Window,
    first_load_plan,
    load_windows,
    logged_progress,
    plan_windows,
    width,
)
from etl.sync.run import Clock, Run, recorded_run, utcnow

log = logging.getLogger(__name__)

STREAM = "orders"
# Consecutive per-order failures that look like an outage (network, 5xx, 429) before settling
# gives up: one order's trouble is that order's, three in a row are the API's.
OUTAGE_STREAK = 3
# How often (seconds) a thread holding the GIL hands it over, for a process running pulls
# (``sys.setswitchinterval``; Python's default is 0.005). A pull's fetcher, parser and writers
# share one interpreter: at 0.5 ms the fetcher's next request waits less behind parsing, which
# made a first load about 5% faster and a fetch alone about 9%.
SWITCH_INTERVAL = 0.0005


@dataclass
class NewAccount:
    """A first load's belief that the account has no stored orders, shared by the page
    writers of a run: while it holds, pages are COPYed straight into ``orders``
    (:func:`copy_new_orders`). The first page that finds one of its orders stored ends it, and
    every later page is merged."""

    holds: bool = True


@dataclass
class PullResult:
    counts: Counts = field(default_factory=Counts)
    open_ids: set[str] = field(default_factory=set)
    subaccounts: set[int] = field(default_factory=set)


def _write_orders(
    new: NewAccount | None, alone: Callable[[Order], bool] | None = None
) -> Write[Order]:
    """The orders' write rule: newest version wins (the guarded merge); while ``new``
    holds, a first load's page is COPYed without a merge, but for the orders that another
    listing of the load may list too (not ``alone``: see :func:`_alone`), which are merged."""

    def write(
        conn: Connection, run: Run, good: Sequence[Order], one_by_one: bool
    ) -> tuple[Counts, list[Rejected]]:
        # The wall clock, not the run's (injectable) one: a queue poll finds the orders that
        # closed since its previous run by this time.
        written_at = utcnow()

        def merge(batch: Sequence[Order], one: bool) -> tuple[Counts, list[Rejected]]:
            return write_records(
                conn,
                batch,
                lambda c, part: upsert_orders(c, part, account=run.account, synced_at=written_at),
                one_by_one=one,
            )

        if new is not None and new.holds and not one_by_one:
            again = [o for o in good if not alone(o)] if alone is not None else []
            fresh = [o for o in good if alone(o)] if again and alone is not None else good
            written = copy_new_orders(conn, fresh, account=run.account, synced_at=written_at)
            if written is not None:
                if not again:
                    return written, []
                merged, refused = merge(again, False)
                return written + merged, refused
            if new.holds:
                new.holds = False
                log.info("some of the orders listed are stored already: merging from now on")
        return merge(good, one_by_one)

    return write


def _checkpoint(conn: Connection, run: Run, checkpoint: Checkpoint) -> None:
    if checkpoint.window is not None:
        mark_window_done(conn, run.account, *checkpoint.window, scope=checkpoint.scope)
    else:
        write_state(conn, run.account, STREAM, watermark=checkpoint.watermark)
        end_load(conn, run.account, STREAM)


def orders_sink(
    new: NewAccount | None = None, alone: Callable[[Order], bool] | None = None
) -> Sink[Order]:
    """How the engine parses and writes order pages (``new`` and ``alone``: see
    :class:`NewAccount` and :func:`_write_orders`)."""
    return Sink(
        stream=STREAM,
        noun="orders",
        parse=parse_order,
        write=_write_orders(new, alone),
        checkpoint=_checkpoint,
    )


_SINK = orders_sink()


def parse_page(
    items: Sequence[Any], *, screened: bool = False
) -> tuple[list[Order], list[Rejected]]:
    """The orders of a page that parse, and the records that do not (logged)."""
    return engine.parse_page(_SINK, items, screened=screened)


def write_page(
    run: Run,
    items: Sequence[Any],
    *,
    checkpoint: Checkpoint | None = None,
    screened: bool = False,
) -> tuple[Counts, list[Order]]:
    """Parse and write one page of orders in one transaction, with the run's counts and, when
    given, the checkpoint. Returns the counts and the orders written."""
    good, bad = parse_page(items, screened=screened)
    return engine.write_parsed(run, _SINK, good, bad, checkpoint=checkpoint), good


def pull(
    run: Run,
    pages: Iterable[Page],
    *,
    checkpoint: Checkpoint | None,
    label: str,
    on_page: PageCallback | None = None,
    keep_open: bool = False,
    new: NewAccount | None = None,
    alone: Callable[[Order], bool] | None = None,
    writer: PageWriter | None = None,
) -> PullResult:
    """Write every page of one listing of orders (:func:`etl.sync.engine.pull`), collecting
    the subaccounts listed and, ``keep_open``, the ids of the open orders listed (what
    settling needs; a full listing's would only cost memory). ``new``, ``alone``: see
    :func:`_write_orders`; ``writer``: a partitioned read's shared writer."""
    result = PullResult()

    def collect(good: list[Order]) -> None:
        for order in good:
            if keep_open and order.is_open:
                result.open_ids.add(order.order_id)
            if order.subaccount_number is not None:
                result.subaccounts.add(order.subaccount_number)

    result.counts += engine.pull(
        run,
        orders_sink(new, alone),
        pages,
        checkpoint=checkpoint,
        label=label,
        on_page=on_page,
        on_records=collect,
        writer=writer,
        progress=writer is None,
    )
    return result


class HistoricalOrders:
    """How a sync asks the historical tier for orders. KALSHI.md does not say whether
    ``/historical/orders`` without ``subaccount`` serves every subaccount or only 0: a listing
    that served no order of another subaccount is followed by one listing per other subaccount
    the account has (those known at the start, those ``/portfolio/subaccounts/balances``
    lists, asked when first needed, and every one listed since), unless some listing of the
    same sync already served another subaccount (then the unfiltered listing serves them
    all). Thread-safe: the windows of a load share one."""

    def __init__(
        self, client: KalshiClient, subaccounts: Iterable[int] = (), *, ask_api: bool = True
    ) -> None:
        self.client = client
        self._subaccounts = set(subaccounts)
        self._ask_api = ask_api
        self._serves_all = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def of_account(cls, conn: Connection, client: KalshiClient, account: str) -> HistoricalOrders:
        """Knowing the subaccounts of ``account``'s stored open orders."""
        return cls(client, open_subaccounts(conn, account))

    def add(self, subaccounts: Iterable[int]) -> None:
        """Subaccounts listed (by either tier): asked for by number where needed."""
        with self._lock:
            self._subaccounts.update(subaccounts)

    def pages(self, **filters: Any) -> Iterator[Page]:
        """Every page of the historical tier for ``filters``."""
        seen_other = False
        for page in self.client.iter_historical_order_pages(**filters):
            seen_other = seen_other or any(
                isinstance(item, dict) and item.get("subaccount_number") not in (None, 0)
                for item in page.items
            )
            yield page
        if seen_other:
            self._serves_all.set()
        if self._serves_all.is_set():
            return
        for subaccount in self._others():
            yield from self.client.iter_historical_order_pages(subaccount=subaccount, **filters)

    def _others(self) -> list[int]:
        with self._lock:  # the windows that need the API's answer wait for the same one
            if self._ask_api:
                self._subaccounts |= self.client.subaccount_numbers()
                self._ask_api = False
            return sorted(self._subaccounts - {0})


def _is_outage(exc: ApiError) -> bool:
    if isinstance(exc, ApiStatusError):
        return exc.status == 429 or exc.status >= 500
    return not isinstance(exc, ApiProtocolError)


def _is_global(exc: ApiError) -> bool:
    return isinstance(exc, ApiStatusError) and exc.status in (401, 403)


class _Failures:
    """Per-order failures of a settle: logged, recorded once each, and an outage detector."""

    def __init__(self) -> None:
        self.recorded: list[Rejected] = []
        self._streak = 0

    def ok(self) -> None:
        self._streak = 0

    def failed(self, order_id: str, ticker: str, exc: ApiError) -> None:
        if _is_global(exc):
            raise exc
        if _is_outage(exc):
            self._streak += 1
            if self._streak >= OUTAGE_STREAK:
                raise exc
        log.warning("could not settle order %s: %s", order_id, exc)
        self.recorded.append(
            Rejected(
                f"could not settle order {order_id[:80]}: {exc}",
                {"order_id": order_id, "ticker": ticker},
            )
        )


def settle(run: Run, client: KalshiClient, *, listed_open: set[str]) -> Counts:
    """Fetch, by id, every order stored as open that the resting listing no longer shows."""
    with connection(run.engine) as conn:
        stale = [o for o in open_orders(conn, run.account) if o.order_id not in listed_open]
    if not stale:
        return Counts()
    log.info("settling %d order(s) no longer listed as resting", len(stale))
    counts = Counts()
    failures = _Failures()
    batch: list[Any] = []
    gone: dict[tuple[str, int | None], dict[str, datetime | None]] = {}
    for order in stale:
        run.check_stop("stopped while settling; the orders settled so far are committed")
        try:
            raw = client.get_order(order.order_id)
        except ApiError as exc:
            failures.failed(order.order_id, order.ticker, exc)
            continue
        failures.ok()
        if raw is None:
            gone.setdefault((order.ticker, order.subaccount_number), {})[order.order_id] = (
                order.created_time
            )
            continue
        batch.append(raw)
        if len(batch) >= client.page_size:
            counts += write_page(run, batch)[0]
            batch = []
    if batch:
        counts += write_page(run, batch)[0]
    for (ticker, subaccount), wanted in sorted(gone.items(), key=lambda kv: str(kv[0])):
        try:
            counts += _settle_from_history(run, client, ticker, subaccount, wanted)
        except ApiError as exc:
            for order_id in wanted:
                failures.failed(order_id, ticker, exc)
    if failures.recorded:
        with run.transaction() as conn:
            written = insert_rejected(
                conn,
                failures.recorded,
                stream=STREAM,
                account=run.account,
                received_at=run.clock(),
                skip_known=True,
            )
            add_to_run(conn, run.run_id, Counts(rejected=written))
        counts += Counts(rejected=written)
    return counts


def _settle_from_history(
    run: Run,
    client: KalshiClient,
    ticker: str,
    subaccount: int | None,
    wanted: dict[str, datetime | None],
) -> Counts:
    """Look the orders of one market (and subaccount) up in the historical tier."""
    created = list(wanted.values())
    # min_ts at the oldest creation bounds the scan whichever timestamp it compares: an
    # order's last update is never before its creation.
    since = None if None in created else min(c for c in created if c is not None)
    counts = Counts()
    missing = set(wanted)
    for page in client.iter_historical_order_pages(
        ticker=ticker,
        min_ts=_seconds(since) if since is not None else None,
        subaccount=subaccount,
    ):
        found = [
            item
            for item in page.items
            if isinstance(item, dict) and item.get("order_id") in missing
        ]
        if found:
            counts += write_page(run, found)[0]
            missing.difference_update(item["order_id"] for item in found)
        if not missing:
            break
    if missing:
        log.warning(
            "%d open order(s) of %s are no longer served by the API; kept as stored: %s",
            len(missing),
            ticker,
            ", ".join(sorted(missing)[:5]),
        )
    return counts


@dataclass(frozen=True)
class SyncResult:
    run_id: int
    counts: Counts
    watermark: datetime | None


def _seconds(value: datetime) -> int:
    return math.floor(value.timestamp())


def sync_orders(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    lookback: timedelta = timedelta(minutes=5),
    lock_wait: float = 30.0,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
) -> SyncResult:
    """One incremental cycle for ``account`` (see the module docstring).

    Raises:
        LockBusyError: another run of this account's orders (a sync or a backfill) holds the
            lock.
        ApiError: the API failed after retries; the run is recorded as failed.
    """
    with recorded_run(
        engine, account, STREAM, "incremental", lock_wait=lock_wait, clock=clock, stop=stop
    ) as run:
        counts, watermark = _cycle(run, client, lookback=lookback)
    metrics.watermark_moved(account, STREAM, watermark)
    return SyncResult(run_id=run.run_id, counts=counts, watermark=watermark)


def _stored_subaccounts(run: Run) -> set[int]:
    with connection(run.engine) as conn:
        return open_subaccounts(conn, run.account)


def _cycle(run: Run, client: KalshiClient, *, lookback: timedelta) -> tuple[Counts, datetime]:
    with connection(run.engine) as conn:
        stored = read_state(conn, run.account, STREAM)
        first = stored is None or stored.watermark is None
        # An account's very first load (not one resumed after a kill) skips the merge.
        new = NewAccount() if first and not has_orders(conn, run.account) else None
    # Taken before the pull: everything the server had seen by then is in what we read. The
    # earlier of server and local time, so a server clock running ahead cannot skip orders.
    local = run.clock()
    server = client.user_data_timestamp()
    as_of = min(server, local) if server is not None else local
    checkpoint = Checkpoint(watermark=as_of)
    since = (
        None
        if first or stored is None or stored.watermark is None
        else (stored.watermark - lookback)
    )

    if since is None:
        with run.transaction() as conn:
            as_of, spans = start_load(conn, run.account, STREAM, as_of)
        log.info("first sync of account %s: loading every order", run.account)
        counts = _load(
            run,
            client,
            first_load_plan(local),
            spans,
            scope="load",
            new=new,
            concurrency=lambda: width(client),
            on_progress=logged_progress("first load of orders", run),
        )
        # The full listing just read holds every open order: a second pass over the resting
        # ones would read them again for nothing. What changed while the listing ran is the
        # next cycle's (the watermark was taken before it).
        write_page(run, [], checkpoint=Checkpoint(watermark=as_of))
        return counts, as_of
    live = pull(
        run,
        client.iter_order_pages(min_ts=_seconds(since)),
        checkpoint=None,
        label="orders since " + since.isoformat(),
    )
    counts = live.counts
    # The cutoff is read after the live pull: orders that moved to the historical tier while
    # the live tier was being read are then still looked for there.
    cutoff = client.historical_cutoff()
    if cutoff is not None and (
        cutoff.orders_updated_ts is not None and since < cutoff.orders_updated_ts
    ):
        history = HistoricalOrders(
            client, live.subaccounts | _stored_subaccounts(run), ask_api=False
        )
        counts += pull(
            run,
            history.pages(min_ts=_seconds(since)),
            checkpoint=None,
            label="historical orders",
        ).counts
    write_page(run, [], checkpoint=checkpoint)

    resting = pull(
        run,
        client.iter_order_pages(status="resting"),
        checkpoint=None,
        label="resting orders",
        keep_open=True,
    )
    counts += resting.counts
    counts += settle(run, client, listed_open=resting.open_ids)
    return counts, as_of


# How far from a window's bounds an order is sure to be listed by that window alone: a
# server's max_ts may include its second, and clocks may differ by a little.
_EDGE = timedelta(seconds=2)
# Changes this close before a load begins may still be in flight between tiers or windows.
_SETTLING = timedelta(minutes=5)


def _alone(win: Window, *, changed_after: datetime) -> Callable[[Order], bool]:
    """Whether an order listed by ``win`` cannot be listed by another listing of the load, so
    that a first load may COPY it: not written already by the window ``win`` was split from
    (``win.seen``); both its timestamps (whichever ``min_ts`` compares) away from ``win``'s
    bounds (a neighbour may list an order on a shared bound); and last changed before
    ``changed_after`` (less a margin): the load's start for the live tier (an order changing
    during the load may move to the newest window), the historical cutoff for that tier (an
    order that moved there while the load ran was listed live too)."""
    edges = [edge for edge in (win.start, win.end) if edge is not None]
    settled = changed_after - _SETTLING

    def alone(order: Order) -> bool:
        stamps = (order.created_time, order.last_update_time)
        if order.order_id in win.seen or order.last_update_time is None:
            return False
        if order.last_update_time >= settled:
            return False
        return all(
            stamp is not None and abs(stamp - edge) > _EDGE for stamp in stamps for edge in edges
        )

    return alone


def _load(
    run: Run,
    client: KalshiClient,
    plan: Sequence[Window],
    spans: Sequence[tuple[int, int]],
    *,
    scope: Scope,
    new: NewAccount | None,
    concurrency: int | Callable[[], int],
    on_progress: ProgressCallback | None,
) -> Counts:
    """Load every order of ``plan``'s windows that ``spans`` leave, several windows at once
    (:func:`etl.sync.partitions.load_windows`), each window's live tier then its historical
    tier; each window recorded done in ``scope`` once read to its end."""
    began = run.clock()
    cutoff = client.historical_cutoff()
    moved_after = began if cutoff is None else (cutoff.orders_updated_ts or began)
    with connection(run.engine) as conn:
        history = HistoricalOrders.of_account(conn, client, run.account)

    def tiers(win: Window, writer: PageWriter) -> list[Tier]:
        def take(label: str, changed_after: datetime) -> Callable[[Iterable[Page]], Counts]:
            def write(pages: Iterable[Page]) -> Counts:
                listed = pull(
                    run,
                    pages,
                    checkpoint=None,
                    label=f"{label} {win.label}",
                    new=new,
                    alone=_alone(win, changed_after=changed_after),
                    writer=writer,
                )
                history.add(listed.subaccounts)
                return listed.counts

            return write

        found = [
            Tier(
                lambda: client.iter_order_pages(min_ts=win.min_ts, max_ts=win.max_ts),
                take("orders", began),
            )
        ]
        if cutoff is not None:
            found.append(
                Tier(
                    lambda: history.pages(min_ts=win.min_ts, max_ts=win.max_ts),
                    take("historical orders", min(began, moved_after)),
                )
            )
        return found

    return load_windows(
        run,
        plan,
        spans,
        tiers,
        sink=_SINK,
        key="order_id",
        scope=scope,
        concurrency=concurrency,
        on_progress=on_progress,
    )


def backfill_orders(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    since: datetime,
    until: datetime,
    window: timedelta = timedelta(days=1),
    concurrency: int | None = None,
    lock_wait: float = 30.0,
    on_progress: ProgressCallback | None = None,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
) -> SyncResult:
    """Load every order with a timestamp in [since, until), live and historical tiers, in
    windows (:mod:`etl.sync.partitions`; ``concurrency`` at once, by default as many as keep
    the key's budget busy). It holds the account's orders lock: a sync of the same account
    waits (or, in the daemon, skips its turn) rather than writing at the same time.

    Raises:
        LockBusyError: another run of this account's orders holds the lock.
        ApiError: a window failed after retries; completed windows stay done.
    """
    with recorded_run(
        engine, account, STREAM, "backfill", lock_wait=lock_wait, clock=clock, stop=stop
    ) as run:
        with connection(engine) as conn:
            spans = backfill_coverage(conn, account, STREAM)
            # A new account's backfill skips the merge, as its first sync does.
            new = None if spans or has_orders(conn, account) else NewAccount()
        total = _load(
            run,
            client,
            plan_windows(since, until, window),
            spans,
            scope="backfill",
            new=new,
            concurrency=concurrency or (lambda: width(client)),
            on_progress=on_progress,
        )
    return SyncResult(run_id=run.run_id, counts=total, watermark=None)
