"""Realtime: the account's WebSocket channels written into their tables, reconciled by REST.

The channels (:data:`CHANNELS`): ``user_orders`` into ``orders``, ``fill`` into ``fills`` and
``market_positions`` into ``position_snapshots`` (stamped with the receive time: the channel
sends none), all on one connection. Three threads per account:

- the **stream** (:class:`~etl.kalshi.stream.AccountStream`) receives messages and queues them
  in a bounded inbox (:data:`INBOX_LIMIT`): while the database is away they wait there, and
  once it is full new ones are dropped, the gap is marked and the REST catch-up that follows
  the outage reads those records again;
- the **writer** commits them in micro-batches: whatever arrived while the previous batch was
  committing, at most :data:`MAX_BATCH` messages, so a change waits for at most one commit
  before its own (a few milliseconds; never more than ~50 ms at hundreds of changes a second).
  Each message is parsed by the same parser as REST's records and written by the same rule
  (an order version never replaces a newer one, REST's or the stream's, and at equal times
  REST's stays; a fill is written once, deduplicated by ``trade_id`` = ``fill_id``, and REST's
  version replaces the channel's). Malformed messages go to ``rejected_records``. The
  ``sync_state`` row ``<stream>:stream`` (``orders:stream``, ``fills:stream``) records, in the
  same transaction, the newest exchange time committed from that channel;
- the **catch-up** runs the incremental REST sync of every channel's stream after every
  acknowledged subscription (first connect and each reconnect): the channels have no sequence
  numbers and no snapshot, so what changed while no connection was up is read from REST, with a
  lookback reaching back to the last message committed before the drop.

The daemon's periodic REST cycle stays as the safety net; :meth:`RealtimeAccount.rest_due`
tells it to run the orders sync less often while the stream is up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, Engine

from etl import metrics
from etl.db.engine import connection, transaction
from etl.db.state import live_stream, read_state, write_state
from etl.db.upsert import Counts, insert_rejected, refusal_safe, upsert_orders, write_records
from etl.db.write import ChangeOnly, write_snapshots
from etl.errors import DatabaseError, EtlError, LockBusyError, StopRequested
from etl.kalshi.auth import KalshiAuth
from etl.kalshi.client import KalshiClient
from etl.kalshi.parse import Fill, Order, Rejected, parse_fill, parse_user_order
from etl.kalshi.parse.account import (
    POSITION_STREAM_COMPARES,
    MarketPosition,
    parse_position_message,
)
from etl.kalshi.stream import MESSAGE_TYPES, AccountStream, StreamPolicy
from etl.streams.fills import FILLS
from etl.streams.positions import POSITIONS
from etl.streams.registry import CHANNEL_OF
from etl.sync.listing import rows_of, sync_listing, write_listed
from etl.sync.orders import SyncResult, sync_orders

log = logging.getLogger(__name__)

MAX_BATCH = 500
MARGIN = timedelta(seconds=5)  # extra lookback before the last message, for clock skew
# Messages kept while they cannot be written (the database away): about 3 MB. Past it they
# are dropped, the gap is marked, and the REST catch-up reads those records again.
INBOX_LIMIT = 10_000
SUMMARY_EVERY = 60.0  # seconds between the log lines of an outage that lasts


@dataclass(frozen=True)
class Batch:
    """What one commit of stream messages did."""

    counts: Counts
    lags: list[float]  # exchange time → commit, per change (seconds)


# How a channel's records are written (in the caller's transaction), and what they refused.
Writer = Callable[[Connection, Sequence[Any], str, datetime, bool], tuple[Counts, list[Rejected]]]
# The REST sync that catches a channel's stream up: (engine, client, account, lookback, stop).
CatchUp = Callable[[Engine, KalshiClient, str, timedelta, threading.Event], SyncResult]


@dataclass(frozen=True)
class Channel:
    """One WebSocket channel as the realtime path writes it.

    Attributes:
        name: the channel subscribed to (``fill``).
        stream: its stream (``rejected_records``, ``sync_state`` row ``<stream>:stream``).
        parse: a message's ``msg`` and when it arrived → a record, or a :class:`Rejected`.
        write: writes parsed records by the stream's rule.
        exchange_time: a record's exchange time (the watermark and the lag).
        catch_up: the stream's incremental REST sync.
    """

    name: str
    stream: str
    parse: Callable[[Any, datetime], Any]
    write: Writer
    exchange_time: Callable[[Any], datetime | None]
    catch_up: CatchUp

    @property
    def message_type(self) -> str:
        return MESSAGE_TYPES[self.name]


def _write_orders(
    conn: Connection, records: Sequence[Order], account: str, now: datetime, one_by_one: bool
) -> tuple[Counts, list[Rejected]]:
    return write_records(
        conn,
        records,
        lambda c, rs: upsert_orders(c, rs, account=account, synced_at=now, from_stream=True),
        one_by_one=one_by_one,
    )


def _write_fills(
    conn: Connection, records: Sequence[Fill], account: str, now: datetime, one_by_one: bool
) -> tuple[Counts, list[Rejected]]:
    return write_listed(conn, FILLS, account, records, synced_at=now, one_by_one=one_by_one)


def _sync_fills(
    db: Engine, client: KalshiClient, account: str, lookback: timedelta, stop: threading.Event
) -> SyncResult:
    return sync_listing(
        db, client, FILLS, account=account, lookback=lookback, lock_wait=60.0, stop=stop
    )


def _write_positions(
    conn: Connection,
    records: Sequence[MarketPosition],
    account: str,
    now: datetime,
    one_by_one: bool,
) -> tuple[Counts, list[Rejected]]:
    """Snapshots stamped with each message's receive time, comparing only the fields the
    channel carries (the others kept from the latest row)."""

    def write(c: Connection, batch: Sequence[MarketPosition]) -> Counts:
        rows = [
            {**row, "captured_at": record.captured_at or now}
            for row, record in zip(rows_of(POSITIONS, account, batch), batch, strict=True)
        ]
        assert isinstance(POSITIONS.rule, ChangeOnly)
        return write_snapshots(
            c, POSITIONS.rule, rows, captured_at=now, compared=POSITION_STREAM_COMPARES
        )

    return write_records(conn, records, write, one_by_one=one_by_one)


def _sync_positions(
    db: Engine, client: KalshiClient, account: str, lookback: timedelta, stop: threading.Event
) -> SyncResult:
    return sync_listing(db, client, POSITIONS, account=account, lock_wait=60.0, stop=stop)


def _sync_orders(
    db: Engine, client: KalshiClient, account: str, lookback: timedelta, stop: threading.Event
) -> SyncResult:
    return sync_orders(db, client, account=account, lookback=lookback, lock_wait=60.0, stop=stop)


CHANNELS: dict[str, Channel] = {
    c.name: c
    for c in (
        Channel(
            name=CHANNEL_OF["orders"],
            stream="orders",
            parse=lambda msg, _received: parse_user_order(msg),
            write=_write_orders,
            exchange_time=lambda o: o.last_update_time or o.created_time,
            catch_up=_sync_orders,
        ),
        Channel(
            name=CHANNEL_OF["fills"],
            stream="fills",
            parse=lambda msg, _received: parse_fill(msg),
            write=_write_fills,
            exchange_time=lambda f: f.created_time,
            catch_up=_sync_fills,
        ),
        Channel(
            name=CHANNEL_OF["positions"],
            stream="positions",
            parse=lambda msg, received: parse_position_message(msg, received=received),
            write=_write_positions,
            exchange_time=lambda _p: None,  # the channel sends no time
            catch_up=_sync_positions,
        ),
    )
}


class RealtimeAccount:
    """The realtime path of one account (see the module docstring).

    Args:
        engine: the database.
        client: the account's REST client (for the catch-up syncs).
        account: the account name in the tables.
        stream_url: the WebSocket URL.
        stop: ends every thread; pending messages are committed first.
        lookback: the REST sync's usual lookback (the catch-up reaches further when needed).
        policy: the stream's timeouts and backoff.
        channels: the channels to stream (keys of :data:`CHANNELS`).
    """

    def __init__(
        self,
        engine: Engine,
        client: KalshiClient,
        *,
        account: str,
        stream_url: str,
        stop: threading.Event,
        lookback: timedelta = timedelta(minutes=5),
        policy: StreamPolicy | None = None,
        inbox_limit: int = INBOX_LIMIT,
        channels: Sequence[str] = ("user_orders", "fill", "market_positions"),
    ) -> None:
        self.engine = engine
        self.client = client
        self.account = account
        self.stop = stop
        self.lookback = lookback
        auth = client.auth
        if not isinstance(auth, KalshiAuth):
            raise EtlError("the realtime stream needs a client that signs with an API key")
        self.channels = [CHANNELS[name] for name in channels]
        self._by_type = {c.message_type: c for c in self.channels}
        self.stream = AccountStream(
            stream_url,
            auth,
            self,
            stop=stop,
            policy=policy or StreamPolicy(),
            channels=[c.name for c in self.channels],
        )
        self.name = self.stream.name  # how logs call it: user_orders+fill
        self._inbox: queue.Queue[tuple[Any, float]] = queue.Queue(maxsize=inbox_limit)
        self._dropped = 0  # messages dropped since the last catch-up was asked for
        self.dropped_total = 0
        self._catch_up = threading.Event()
        self._connected = threading.Event()
        self._last_exchange_time: datetime | None = None  # newest change committed
        # The last change committed before the earliest drop not yet caught up: where the
        # next catch-up's lookback must reach (messages of the new connection may be newer).
        self._gap_start: datetime | None = None
        self._gap_lock = threading.Lock()
        self._last_rest = time.monotonic()  # the daemon just started: its first cycle is due
        self._rest_lock = threading.Lock()
        self.catch_ups = 0  # REST catch-ups that succeeded, for tests and logs
        self._threads = [
            threading.Thread(target=self.stream.run, name=f"stream {account}", daemon=True),
            threading.Thread(target=self._write_loop, name=f"stream writer {account}", daemon=True),
            threading.Thread(target=self._catch_up_loop, name=f"catch-up {account}", daemon=True),
        ]

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        metrics.stream_starting(self.account)
        with connection(self.engine) as conn:
            stored = [read_state(conn, self.account, live_stream(c.stream)) for c in self.channels]
        marks = [s.watermark for s in stored if s is not None and s.watermark is not None]
        if marks:  # what was sent since the earliest of them may have been missed
            self._last_exchange_time, self._gap_start = max(marks), min(marks)
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float) -> bool:
        """Wait for the threads after ``stop`` was set; ``False`` if one is still running."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def rest_due(self, every: timedelta) -> bool:
        """Whether the periodic REST cycle should run now: always while the stream is down,
        else once ``every`` has passed since the last REST sync of this process."""
        with self._rest_lock:
            elapsed = time.monotonic() - self._last_rest
        return not self.connected or elapsed >= every.total_seconds()

    def rest_synced(self) -> None:
        with self._rest_lock:
            self._last_rest = time.monotonic()

    # -- StreamListener -------------------------------------------------------------------

    def subscribed(self) -> None:
        self._connected.set()
        metrics.stream_connected(self.account)
        self._catch_up.set()

    def message(self, body: Any, received: float) -> None:
        try:
            self._inbox.put_nowait((body, received))
        except queue.Full:
            # The database has been away for long: keep memory bounded. Everything after the
            # last change committed may now be missing: the catch-up reads it from REST.
            if self._dropped == 0:
                log.warning(
                    "%s stream of %s: %d messages wait for the database; dropping "
                    "new ones until it is back (the REST catch-up reads those records again)",
                    self.name,
                    self.account,
                    self._inbox.maxsize,
                )
            self._dropped += 1
            self.dropped_total += 1
            self._keep_gap(self._last_exchange_time)
            metrics.stream_dropped_messages(self.account)
        metrics.stream_backlog(self.account, self._inbox.qsize())

    def disconnected(self, reason: str) -> None:
        self._connected.clear()
        self._keep_gap(self._last_exchange_time)
        metrics.stream_dropped(self.account, reason)

    def _keep_gap(self, start: datetime | None) -> None:
        """Remember that changes after ``start`` may have been missed (the earliest wins)."""
        if start is None:
            return
        with self._gap_lock:
            if self._gap_start is None or start < self._gap_start:
                self._gap_start = start

    # -- writer ---------------------------------------------------------------------------

    def _write_loop(self) -> None:
        pending: list[tuple[Any, float]] = []
        outage: _Outage | None = None
        while True:
            if not pending:  # a new batch (a batch that failed is retried as it is: bounded)
                try:
                    pending.append(self._inbox.get(timeout=0.2))
                except queue.Empty:
                    if self.stop.is_set() and self.stream_done():
                        return
                    continue
                while len(pending) < MAX_BATCH:
                    try:
                        pending.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
            try:
                self.write(pending)
                pending = []
                metrics.stream_backlog(self.account, self._inbox.qsize())
                if outage is not None:
                    outage.ended(self)
                    outage = None
                if self._dropped:
                    self._dropped = 0
                    self._catch_up.set()  # what was dropped is read again from REST
            except DatabaseError as exc:
                # Keep the batch and try again: what the stream delivered waits (up to the
                # inbox's bound) while the database is away. One line when it starts, a
                # summary every minute it lasts, one when it ends.
                if outage is None:
                    outage = _Outage(exc)
                    log.error(
                        "%s stream of %s: %s; keeping the messages and retrying every second",
                        self.name,
                        self.account,
                        exc,
                    )
                outage.still(self, len(pending))
                if self.stop.wait(1.0):
                    log.warning(
                        "%s stream of %s: stopping with %d messages not written; "
                        "the next REST sync reads those records again",
                        self.name,
                        self.account,
                        len(pending) + self._inbox.qsize(),
                    )
                    return
                self._catch_up.set()  # the database was away: reconcile once it is back
            except Exception as exc:  # a bug: say so, keep streaming, let REST cover the batch
                log.error(
                    "%s stream of %s: could not write %d messages: %s: %s (a bug: "
                    "please report it; the REST catch-up reads those records again)",
                    self.name,
                    self.account,
                    len(pending),
                    type(exc).__name__,
                    exc,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
                pending = []
                self._catch_up.set()

    def stream_done(self) -> bool:
        return not self._threads[0].is_alive()

    def write(self, messages: list[tuple[Any, float]]) -> Batch:
        """Commit ``messages`` (as received, with their arrival times) in one transaction."""
        records: dict[str, list[Any]] = {c.name: [] for c in self.channels}
        rejected: dict[str, list[Rejected]] = {c.stream: [] for c in self.channels}
        for body, received in messages:
            channel, parsed = self._parse(body, datetime.fromtimestamp(received, UTC))
            if isinstance(parsed, Rejected):
                rejected[channel.stream].append(parsed)
            else:
                records[channel.name].append(parsed)
        now = datetime.now(UTC)
        stamps: dict[str, list[datetime]] = {
            c.name: [t for t in map(c.exchange_time, records[c.name]) if t is not None]
            for c in self.channels
        }

        def attempt(one_by_one: bool) -> Counts:
            total = Counts()
            with transaction(self.engine) as conn:
                for channel in self.channels:
                    counts, refused = channel.write(
                        conn, records[channel.name], self.account, now, one_by_one
                    )
                    kept = [*rejected[channel.stream], *refused]
                    insert_rejected(  # kept once; counted as met
                        conn, kept, stream=channel.stream, account=self.account, received_at=now
                    )
                    newest = max(stamps[channel.name], default=None)
                    if newest is not None:
                        state = live_stream(channel.stream)
                        write_state(conn, self.account, state, watermark=newest)
                    total += counts + Counts(rejected=len(kept))
            return total

        counts = refusal_safe(attempt, what=f"a batch of {self.name} messages")
        committed = time.time()
        every = [t for ts in stamps.values() for t in ts]
        lags = [committed - t.timestamp() for t in every]
        metrics.stream_committed(self.account, asdict(counts), lags)
        newest = max(every, default=None)
        if newest is not None and (
            self._last_exchange_time is None or newest > self._last_exchange_time
        ):
            self._last_exchange_time = newest
        return Batch(counts=counts, lags=lags)

    def _parse(self, body: Any, received: datetime) -> tuple[Channel, Any]:
        """The channel of a message, and its ``msg`` parsed (a :class:`Rejected` when bad; a
        message that is not a JSON object is counted against the first channel's stream)."""
        if not isinstance(body, dict):
            return self.channels[0], Rejected(f"{self.name} message: not a JSON object", body)
        channel = self._by_type.get(str(body.get("type")), self.channels[0])
        return channel, channel.parse(body.get("msg"), received)

    # -- catch-up -------------------------------------------------------------------------

    def _catch_up_loop(self) -> None:
        failures = 0
        last_error = ""
        while not self.stop.is_set():
            if not self._catch_up.wait(0.25):
                continue
            self._catch_up.clear()
            try:
                self.catch_up()
                failures, last_error = 0, ""
            except StopRequested:
                return
            except LockBusyError as exc:
                log.info("REST catch-up of %s waits: %s", self.account, exc)
                self._retry_catch_up(2.0)
            except EtlError as exc:
                failures += 1
                delay = min(60.0, 2.0**failures)
                # Once per streak of the same failure (an outage is one line, not one a try).
                repeated = str(exc) == last_error
                last_error = str(exc)
                log.log(
                    logging.DEBUG if repeated else logging.ERROR,
                    "REST catch-up of %s failed: %s; trying again in %.0fs%s",
                    self.account,
                    exc,
                    delay,
                    "" if repeated else " (and with a backoff up to 60s while it fails)",
                )
                self._retry_catch_up(delay)
            except Exception as exc:  # a bug: say so; the periodic REST cycle still runs
                log.error(
                    "REST catch-up of %s failed unexpectedly: %s: %s (a bug: please report it)",
                    self.account,
                    type(exc).__name__,
                    exc,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
                self._retry_catch_up(60.0)

    def _retry_catch_up(self, delay: float) -> None:
        if not self.stop.wait(delay):
            self._catch_up.set()

    def catch_up(self) -> None:
        """The incremental REST sync of each channel's stream, with a lookback reaching the
        last change committed from the stream (less a margin), so that whatever changed while
        no connection was up is read."""
        with self._gap_lock:
            gap_start, self._gap_start = self._gap_start, None
        lookback = self.lookback
        if gap_start is not None:
            lookback = max(lookback, datetime.now(UTC) - gap_start + MARGIN)
        log.info(
            "%s stream of %s subscribed: catching up with REST (lookback %s)",
            self.name,
            self.account,
            timedelta(seconds=round(lookback.total_seconds())),
        )
        done = []
        try:
            for channel in self.channels:
                result = channel.catch_up(
                    self.engine, self.client, self.account, lookback, self.stop
                )
                c = result.counts
                done.append(
                    f"{channel.stream} fetched {c.fetched}, inserted {c.inserted}, "
                    f"updated {c.updated}"
                )
        except BaseException:
            self._keep_gap(gap_start)  # not caught up: the next attempt reaches as far back
            raise
        self.rest_synced()
        self.catch_ups += 1
        log.info("REST catch-up of %s done: %s", self.account, "; ".join(done))


class _Outage:
    """The database away for the stream's writer: when it began, and what to say of it."""

    def __init__(self, exc: DatabaseError) -> None:
        self.began = time.monotonic()
        self.said = self.began
        self.error = str(exc)

    def still(self, stream: RealtimeAccount, pending: int) -> None:
        waiting = pending + stream._inbox.qsize()
        metrics.stream_backlog(stream.account, waiting)
        now = time.monotonic()
        if now - self.said >= SUMMARY_EVERY:
            self.said = now
            log.warning(
                "%s stream of %s: the database has been away for %.0fs; %d messages "
                "waiting, %d dropped",
                stream.name,
                stream.account,
                now - self.began,
                waiting,
                stream.dropped_total,
            )

    def ended(self, stream: RealtimeAccount) -> None:
        log.info(
            "%s stream of %s: the database is back after %.0fs; the waiting messages "
            "are written (%d dropped in all, read again by the REST catch-up)",
            stream.name,
            stream.account,
            time.monotonic() - self.began,
            stream.dropped_total,
        )
