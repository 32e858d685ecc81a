"""Orders sync: pages → parse → upsert → state, one transaction per page.

A *pull* reads one filtered listing page by page; each page's orders and rejected records are
committed together with the run's counts. The watermark moves only in the transaction of the
page that completes the pull that justifies it: the API's sort order is unknown, so a half-read
pull justifies nothing. A kill at any instant therefore loses nothing, and a rerun converges.

One cycle (:func:`sync_orders`):

1. first run of an account (no watermark): every live order, then every historical one (live
   first: orders only ever move live → historical, so nothing slips between the two);
   later runs: live orders with ``min_ts = watermark − lookback`` (and the historical tier
   too when that reaches past its cutoff);
2. every resting order (``status=resting``), whichever timestamp ``min_ts`` compares;
3. settle: each order the table holds as open but step 2 did not list is fetched by id
   (404 → looked up in the historical tier by its ticker).

The new watermark is the server's ``user_data_timestamp`` taken *before* step 1 (the local
clock where the server has none, or where it is earlier): never past what the server has seen,
never backwards.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from etl.db.engine import stream_lock
from etl.db.state import (
    Mode,
    add_to_run,
    finish_run,
    mark_window_done,
    open_orders,
    read_state,
    start_run,
    windows_done,
    write_state,
)
from etl.db.upsert import Counts, insert_rejected, upsert_orders
from etl.errors import ApiProtocolError, StopRequested
from etl.kalshi.client import KalshiClient, Page
from etl.kalshi.parse import Order, Rejected, parse_order

log = logging.getLogger(__name__)

STREAM = "orders"
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Checkpoint:
    """What the page that completes a pull writes to ``sync_state`` with its rows."""

    watermark: datetime | None = None
    stream: str = STREAM
    window: str | None = None


@dataclass
class PullResult:
    counts: Counts = field(default_factory=Counts)
    open_ids: set[str] = field(default_factory=set)


class Progress:
    """Logs a pull's progress at most every ``every`` seconds: counts and rate."""

    def __init__(self, label: str, *, every: float = 5.0) -> None:
        self.label = label
        self.every = every
        self.started = time.monotonic()
        self._last = self.started
        self.fetched = 0

    def add(self, fetched: int) -> None:
        self.fetched += fetched
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            rate = self.fetched / max(now - self.started, 1e-9)
            log.info("%s: %d orders so far (%.0f/s)", self.label, self.fetched, rate)


_END = object()


def prefetched(pages: Iterable[Page], *, depth: int = 1) -> Generator[Page, None, None]:
    """Fetch up to ``depth`` pages ahead on a thread, so the API's latency overlaps the
    database write of the page before. Errors surface at the page where they happened; a
    page fetched but not yet written is simply fetched again by the next run."""
    handoff: queue.Queue[object] = queue.Queue(maxsize=depth)
    closed = threading.Event()

    def put(item: object) -> bool:
        while not closed.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for page in pages:
                if not put(page):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    threading.Thread(target=produce, name="page-prefetch", daemon=True).start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Page)
            yield item
    finally:
        closed.set()


def write_page(
    engine: Engine,
    items: Sequence[Any],
    *,
    account: str,
    run_id: int,
    checkpoint: Checkpoint | None = None,
    clock: Clock = utcnow,
) -> tuple[Counts, list[Order]]:
    """Parse and write one page in one transaction, with the run's counts and, when given,
    the checkpoint. Returns the counts and the parsed orders."""
    parsed = [parse_order(item) for item in items]
    good = [p for p in parsed if isinstance(p, Order)]
    bad = [p for p in parsed if isinstance(p, Rejected)]
    for rejected in bad:
        log.warning("rejected an order record: %s", rejected.reason)
    now = clock()
    with engine.begin() as conn:
        counts = upsert_orders(conn, good, synced_at=now)
        rejected_count = insert_rejected(conn, bad, stream=STREAM, account=account, received_at=now)
        counts = counts + Counts(fetched=rejected_count, rejected=rejected_count)
        add_to_run(conn, run_id, counts)
        if checkpoint is not None and checkpoint.window is not None:
            mark_window_done(conn, account, checkpoint.stream, checkpoint.window)
        elif checkpoint is not None:
            write_state(conn, account, checkpoint.stream, watermark=checkpoint.watermark)
    return counts, good


def keep_unparseable_body(engine: Engine, exc: ApiProtocolError, *, account: str) -> None:
    """A page whose body was not JSON: keep the body in ``rejected_records`` before failing."""
    if exc.body is None:
        return
    with engine.begin() as conn:
        insert_rejected(
            conn,
            [Rejected(str(exc), exc.body)],
            stream=STREAM,
            account=account,
            received_at=utcnow(),
        )


def pull(
    engine: Engine,
    pages: Iterable[Page],
    *,
    account: str,
    run_id: int,
    checkpoint: Checkpoint | None,
    label: str,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
) -> PullResult:
    """Write every page of one listing, each in its own transaction; the page that completes
    the listing carries ``checkpoint``.

    Raises:
        StopRequested: ``stop`` was set; the page in flight was committed first.
    """
    result = PullResult()
    progress = Progress(label)
    iterator = prefetched(pages)
    seen_page = False
    try:
        while True:
            try:
                page = next(iterator)
            except StopIteration:
                if not seen_page and checkpoint is not None:
                    # A listing with no page at all (a tier the server lacks) is complete too.
                    write_page(
                        engine,
                        [],
                        account=account,
                        run_id=run_id,
                        checkpoint=checkpoint,
                        clock=clock,
                    )
                return result
            except ApiProtocolError as exc:
                keep_unparseable_body(engine, exc, account=account)
                raise
            counts, orders = write_page(
                engine,
                page.items,
                account=account,
                run_id=run_id,
                checkpoint=checkpoint if page.is_last else None,
                clock=clock,
            )
            seen_page = True
            result.counts += counts
            result.open_ids.update(o.order_id for o in orders if o.is_open)
            progress.add(len(page.items))
            if stop is not None and stop.is_set() and not page.is_last:
                raise StopRequested(f"stopped during {label}; the pages read so far are committed")
    finally:
        iterator.close()  # stops the prefetch thread at once, whatever ended the pull


def settle(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    run_id: int,
    listed_open: set[str],
    clock: Clock = utcnow,
) -> Counts:
    """Fetch, by id, every order stored as open that the resting listing no longer shows."""
    with engine.connect() as conn:
        stale = [o for o in open_orders(conn) if o.order_id not in listed_open]
    if not stale:
        return Counts()
    log.info("settling %d order(s) no longer listed as resting", len(stale))
    counts = Counts()
    batch: list[Any] = []
    gone: dict[str, set[str]] = {}
    oldest: dict[str, datetime | None] = {}
    for order in stale:
        raw = client.get_order(order.order_id)
        if raw is None:
            gone.setdefault(order.ticker, set()).add(order.order_id)
            # min_ts at the oldest creation bounds the scan whichever timestamp it compares:
            # an order's last update is never before its creation.
            held = oldest.get(order.ticker, order.created_time)
            oldest[order.ticker] = (
                None
                if held is None or order.created_time is None
                else min(held, order.created_time)
            )
            continue
        batch.append(raw)
        if len(batch) >= client.page_size:
            counts += write_page(engine, batch, account=account, run_id=run_id, clock=clock)[0]
            batch = []
    if batch:
        counts += write_page(engine, batch, account=account, run_id=run_id, clock=clock)[0]
    for ticker, wanted in sorted(gone.items()):
        since = oldest[ticker]
        min_ts = _seconds(since) if since is not None else None
        for page in client.iter_historical_order_pages(ticker=ticker, min_ts=min_ts):
            found = [
                item
                for item in page.items
                if isinstance(item, dict) and item.get("order_id") in wanted
            ]
            if found:
                counts += write_page(engine, found, account=account, run_id=run_id, clock=clock)[0]
                wanted.difference_update(item["order_id"] for item in found)
            if not wanted:
                break
        if wanted:
            log.warning(
                "%d open order(s) of %s are no longer served by the API; kept as stored: %s",
                len(wanted),
                ticker,
                ", ".join(sorted(wanted)[:5]),
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
        LockBusyError: another run of this account's orders stream holds the lock.
        ApiError: the API failed after retries; the run is recorded as failed.
    """
    with stream_lock(engine, account, STREAM, wait=lock_wait):
        return _run(
            engine,
            account,
            "incremental",
            lambda run_id: _cycle(
                engine,
                client,
                account=account,
                run_id=run_id,
                lookback=lookback,
                clock=clock,
                stop=stop,
            ),
        )


def _run(
    engine: Engine, account: str, mode: Mode, body: Callable[[int], tuple[Counts, datetime | None]]
) -> SyncResult:
    with engine.begin() as conn:
        run_id = start_run(conn, account, STREAM, mode)
    try:
        counts, watermark = body(run_id)
    except BaseException as exc:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            message = "interrupted"
        elif isinstance(exc, StopRequested):
            message = f"stopped on request: {exc}"
        with engine.begin() as conn:
            finish_run(conn, run_id, "failed", error=message)
        raise
    with engine.begin() as conn:
        finish_run(conn, run_id, "succeeded")
    log.info(
        "orders %s run %d: fetched %d, inserted %d, updated %d, unchanged %d, rejected %d",
        mode,
        run_id,
        counts.fetched,
        counts.inserted,
        counts.updated,
        counts.unchanged,
        counts.rejected,
    )
    return SyncResult(run_id=run_id, counts=counts, watermark=watermark)


def _cycle(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    run_id: int,
    lookback: timedelta,
    clock: Clock,
    stop: threading.Event | None,
) -> tuple[Counts, datetime | None]:
    with engine.connect() as conn:
        stored = read_state(conn, account, STREAM)
    # Taken before the pull: everything the server had seen by then is in what we read. The
    # earlier of server and local time, so a server clock running ahead cannot skip orders.
    local = clock()
    server = client.user_data_timestamp()
    as_of = min(server, local) if server is not None else local
    cutoff = client.historical_cutoff()
    checkpoint = Checkpoint(watermark=as_of)

    pulls: list[tuple[str, Iterable[Page]]]
    if stored is None or stored.watermark is None:
        log.info("first sync of account %s: loading every order", account)
        pulls = [("live orders", client.iter_order_pages())]
        if cutoff is not None:
            pulls.append(("historical orders", client.iter_historical_order_pages()))
    else:
        since = stored.watermark - lookback
        pulls = [
            ("orders since " + since.isoformat(), client.iter_order_pages(min_ts=_seconds(since)))
        ]
        if cutoff is not None and cutoff.orders_updated_ts and since < cutoff.orders_updated_ts:
            pulls.append(
                ("historical orders", client.iter_historical_order_pages(min_ts=_seconds(since)))
            )

    counts = Counts()
    for index, (label, pages) in enumerate(pulls):
        last = index == len(pulls) - 1
        result = pull(
            engine,
            pages,
            account=account,
            run_id=run_id,
            checkpoint=checkpoint if last else None,
            label=label,
            clock=clock,
            stop=stop,
        )
        counts += result.counts

    resting = pull(
        engine,
        client.iter_order_pages(status="resting"),
        account=account,
        run_id=run_id,
        checkpoint=None,
        label="resting orders",
        clock=clock,
        stop=stop,
    )
    counts += resting.counts
    counts += settle(
        engine, client, account=account, run_id=run_id, listed_open=resting.open_ids, clock=clock
    )
    return counts, as_of


@dataclass(frozen=True)
class Window:
    """A half-open time range [start, end) of a backfill, fetched as one unit."""

    start: datetime
    end: datetime

    @property
    def key(self) -> str:
        return f"{_seconds(self.start)}-{_seconds(self.end)}"


def plan_windows(since: datetime, until: datetime, size: timedelta) -> list[Window]:
    """Cut [since, until) into windows of ``size`` (the last one shorter), newest first."""
    if size <= timedelta(0):
        raise ValueError("window size must be positive")
    windows = []
    start = since
    while start < until:
        end = min(start + size, until)
        windows.append(Window(start, end))
        start = end
    return windows[::-1]


BackfillProgress = Callable[[int, int, Counts], None]


def backfill_orders(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    since: datetime,
    until: datetime,
    window: timedelta = timedelta(days=1),
    concurrency: int = 4,
    lock_wait: float = 30.0,
    on_progress: BackfillProgress | None = None,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
) -> SyncResult:
    """Load every order with a timestamp in [since, until), live and historical tiers.

    The range is cut into windows fetched ``concurrency`` at a time; a window is recorded as
    done in the transaction of its last page, so a rerun with the same range and window
    skips the windows already done. ``on_progress(done, total, counts)`` is called after each.

    Raises:
        LockBusyError: another backfill of this account is running.
        ApiError: a window failed after retries; completed windows stay done.
    """
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    plan = plan_windows(since, until, window)
    stream = f"{STREAM}:backfill:{_seconds(since)}-{_seconds(until)}/{int(window.total_seconds())}s"
    with stream_lock(engine, account, f"{STREAM}:backfill", wait=lock_wait):
        with engine.connect() as conn:
            done = windows_done(conn, account, stream)
        todo = [w for w in plan if w.key not in done]
        if done:
            log.info("backfill resumes: %d of %d windows already done", len(done), len(plan))
        has_history = False

        def run_window(run_id: int, win: Window) -> Counts:
            if stop is not None and stop.is_set():
                raise StopRequested("stopped before every window was fetched")
            checkpoint = Checkpoint(stream=stream, window=win.key)
            lo, hi = _seconds(win.start), math.ceil(win.end.timestamp())
            live = pull(
                engine,
                client.iter_order_pages(min_ts=lo, max_ts=hi),
                account=account,
                run_id=run_id,
                checkpoint=None if has_history else checkpoint,
                label=f"orders {win.start:%Y-%m-%d %H:%M}",
                clock=clock,
                stop=stop,
            )
            if not has_history:
                return live.counts
            historical = pull(
                engine,
                client.iter_historical_order_pages(min_ts=lo, max_ts=hi),
                account=account,
                run_id=run_id,
                checkpoint=checkpoint,
                label=f"historical orders {win.start:%Y-%m-%d %H:%M}",
                clock=clock,
                stop=stop,
            )
            return live.counts + historical.counts

        def body(run_id: int) -> tuple[Counts, datetime | None]:
            nonlocal has_history
            has_history = client.historical_cutoff() is not None
            total = Counts()
            completed = len(plan) - len(todo)
            if on_progress:
                on_progress(completed, len(plan), total)
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                pending = {pool.submit(run_window, run_id, w) for w in todo}
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in finished:
                        error = future.exception()
                        if error is not None:
                            for other in pending:
                                other.cancel()
                            raise error
                        total += future.result()
                        completed += 1
                        if on_progress:
                            on_progress(completed, len(plan), total)
            return total, None

        return _run(engine, account, "backfill", body)
