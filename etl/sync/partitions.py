"""The partitioned reader: one listing read as many time windows at once, under the key's one
token bucket. A first load (``sync`` of a stream with no watermark), a ``backfill`` and
``verify`` all read this way.

A cursor listing is one request at a time: at a round trip of 50 ms it can never make more
than ~15 calls a second, a fraction of a Premier key's 100. Cut by ``min_ts``/``max_ts`` into
windows, the same listing becomes several cursor listings, each read to its end by a thread of
its own; all of them draw on the client's one token bucket, so together they read as fast as
the key's budget allows (:func:`width`: as many windows in flight as keep that budget busy at
the measured round trip), and never faster (no 429).

- **Splitting.** A window whose first page comes back full (it has a next cursor) may be cut,
  its pieces enqueued. Where the page's records come sorted by a timestamp, the span they
  cover tells how many pages the window holds (:func:`estimate_pages`), and a window of more
  than twice :data:`TARGET_PAGES` is cut into pieces of about that many, as many as windows
  are read at once at the end where that page was and the rest as one (the records may not
  reach that far); where no order shows, it is halved while fewer than :data:`SPLIT_AHEAD` ×
  the width are queued or in flight. The page already read is written anyway (one page per
  cut is the cost), its ids handed to the pieces (``Window.seen``) so that a first load's
  ``COPY`` merges rather than copies them again (:class:`Splitting`).
- **Checkpoints.** A window read to its end is recorded done by its bounds (in
  ``sync_state``, a ``<stream>:backfill`` or ``<stream>:load`` row) in the transaction that
  follows its last committed page; a rerun reads only what no done window covers
  (:func:`uncovered`), whatever its own plan.
- **Whatever ``min_ts`` compares.** KALSHI.md does not say whether ``min_ts``/``max_ts``
  compare ``created_time`` or ``last_update_time``. Windows tile the whole time line (the
  oldest has no ``min_ts``, the newest no ``max_ts``), so every order is in one when its window
  is read. An order whose last update moves it to a window already read while the load runs
  is newer than the load's watermark, taken before it: the next incremental sync reads it.
- **Bounded memory.** Each window holds a page in hand and one prefetched; pages flow through
  the run's one page writer, whose depth bounds the writes in flight.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from etl.db.state import Scope
from etl.db.upsert import Counts
from etl.kalshi.client import LIST_COST, KalshiClient, Page
from etl.sync.engine import Checkpoint, PageWriter, Sink, write_parsed
from etl.sync.run import Run

log = logging.getLogger(__name__)

# Where an open-ended window's bounds are recorded (Unix seconds): the start of time, and a
# time no record reaches (year 36812).
OPEN_START = 0
OPEN_END = 2**40
# Before any Kalshi record: where halving a window with no start begins.
FLOOR = datetime(2021, 1, 1, tzinfo=UTC)
# A first load's cuts, back from now: most of an account's records are recent.
# Few: every window costs a call per tier even when empty, and a full one is cut by the
# density its first page shows.
FIRST_LOAD_CUTS = (timedelta(days=7), timedelta(days=90))
MAX_WIDTH = 16
# A window estimated to hold more than twice this many pages is cut into pieces of about it:
# small enough that the last windows to finish leave the budget idle for little time, big
# enough that the page each cut costs (read again by the pieces) is a small share.
TARGET_PAGES = 16
MAX_PIECES = 64
# A window's listing may still split after this many pages of another of its listings (their
# ids handed to the pieces), not after more.
MAX_SEEN_PAGES = 8
# Windows split while fewer than this many times the width are queued or in flight: windows
# of similar sizes, so that the last ones to finish leave the budget idle for little time.
SPLIT_AHEAD = 3
UNLIMITED_WIDTH = 4  # no budget: the machine's CPU binds, a few windows keep it busy
# Past a few windows per core, more wait on the interpreter and hold pages in memory: a
# budget this machine cannot parse and write as fast is out of reach however many read.
CPU_WIDTH = 4 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
DEFAULT_ROUND_TRIP = 0.1  # seconds, before a list call has been timed


@dataclass(frozen=True)
class Window:
    """A half-open time range [start, end) of a listing, read as one cursor listing; ``None``
    is open (no ``min_ts``, no ``max_ts``). ``seen``: ids a window it was split from already
    wrote."""

    start: datetime | None
    end: datetime | None
    seen: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def bounds(self) -> tuple[int, int]:
        """[start, end) in Unix seconds, open ends as :data:`OPEN_START`/:data:`OPEN_END`: the
        key the window is checkpointed by."""
        lo = OPEN_START if self.start is None else math.floor(self.start.timestamp())
        hi = OPEN_END if self.end is None else math.ceil(self.end.timestamp())
        return lo, hi

    @property
    def min_ts(self) -> int | None:
        """The listing's ``min_ts`` (``None``: not sent)."""
        return None if self.start is None else self.bounds[0]

    @property
    def max_ts(self) -> int | None:
        """The listing's ``max_ts`` (``None``: not sent)."""
        return None if self.end is None else self.bounds[1]

    @property
    def label(self) -> str:
        start = "…" if self.start is None else f"{self.start:%Y-%m-%d %H:%M}"
        end = "…" if self.end is None else f"{self.end:%Y-%m-%d %H:%M}"
        return f"{start} → {end}"

    def span(self, now: datetime) -> tuple[datetime, datetime]:
        """The window's bounds, an open start taken at :data:`FLOOR`, an open end at ``now``."""
        return self.start or FLOOR, max(self.end or now, self.start or FLOOR)

    def pieces(self, count: int, now: datetime) -> list[Window] | None:
        """The window cut into ``count`` pieces of equal span (whole seconds; the first keeps
        an open start, the last an open end); ``None`` when too narrow for two."""
        lo, hi = self.span(now)
        count = min(count, int((hi - lo).total_seconds() // 1))
        if count < 2:
            return None
        cuts = [
            datetime.fromtimestamp(math.floor((lo + (hi - lo) * i / count).timestamp()), UTC)
            for i in range(1, count)
        ]
        edges: list[datetime | None] = [self.start, *cuts, self.end]
        return [Window(edges[i], edges[i + 1], self.seen) for i in range(count)]


def plan_windows(since: datetime, until: datetime, size: timedelta) -> list[Window]:
    """Cut [since, until) into windows of ``size`` (the last one shorter), newest first.

    The cuts fall at ``since + k·size`` whatever ``until`` is, so a rerun with a later
    ``until`` (the default, now) plans the same windows and skips the ones done.
    """
    if size <= timedelta(0):
        raise ValueError("window size must be positive")
    windows = []
    start = since
    while start < until:
        end = min(start + size, until)
        windows.append(Window(start, end))
        start = end
    return windows[::-1]


def first_load_plan(now: datetime) -> list[Window]:
    """The whole time line, newest first, cut at :data:`FIRST_LOAD_CUTS` back from ``now``
    (whole hours, so that a rerun soon after plans nearly the same cuts)."""
    hour = now.replace(minute=0, second=0, microsecond=0)
    cuts = [hour - back for back in FIRST_LOAD_CUTS]
    edges: list[datetime | None] = [None, *cuts, None]
    return [Window(edges[i + 1], edges[i]) for i in range(len(edges) - 1)]


def uncovered(win: Window, spans: Sequence[tuple[int, int]]) -> list[Window]:
    """The parts of ``win`` that no span of the merged, sorted ``spans`` covers.

    The newest window of an interrupted backfill ended at that run's "now"; a rerun's newest
    window starts at the same cut but ends later, so only its tail is left to fetch.
    """
    lo, hi = win.bounds
    pieces: list[Window] = []
    cursor = lo
    for a, b in spans:
        if b <= cursor or a >= hi:
            continue
        if a > cursor:
            pieces.append(_piece(win, cursor, a))
        cursor = max(cursor, b)
    if cursor < hi:
        pieces.append(_piece(win, cursor, hi))
    return pieces


def _piece(win: Window, lo: int, hi: int) -> Window:
    lo_bound, hi_bound = win.bounds
    start = win.start if lo == lo_bound else datetime.fromtimestamp(lo, UTC)
    end = win.end if hi == hi_bound else datetime.fromtimestamp(hi, UTC)
    return Window(start, end, win.seen)


def width(client: KalshiClient) -> int:
    """How many windows keep ``client``'s budget busy: list calls a second the budget allows
    × the seconds a list call takes (as measured so far), with half as much again for the
    variance, plus one; between 2 and :data:`MAX_WIDTH` (and :data:`CPU_WIDTH`)."""
    rate = client.bucket.rate
    if rate <= 0:
        return UNLIMITED_WIDTH
    calls = rate / LIST_COST
    seconds = client.list_seconds or DEFAULT_ROUND_TRIP
    return max(2, min(MAX_WIDTH, CPU_WIDTH, math.ceil(calls * seconds * 1.5) + 1))


@dataclass(frozen=True)
class BackfillProgress:
    """Where a partitioned read stands, for a progress display."""

    windows_done: int
    windows_total: int
    records: int  # fetched so far


ProgressCallback = Callable[[BackfillProgress], None]


class Reading:
    """What a window's reader may ask of the read it is part of: count pages, and split."""

    def __init__(self, owner: _Scheduler) -> None:
        self._owner = owner

    def counted(self, fetched: int) -> None:
        """``fetched`` records were read (after each page)."""
        self._owner.counted(fetched)

    def split(self, win: Window, seen: Iterable[str], pages: Estimate | None = None) -> bool:
        """Cut ``win`` and enqueue the pieces; False when not (the reader then reads on).
        ``pages``: what its first page tells of it (:func:`estimate_pages`): a window of more
        than twice :data:`TARGET_PAGES` is cut into pieces of about that many, as many as
        windows are read at once at the end where that page was, the rest of the window one
        piece (the records may not reach that far: an account younger than the window leaves
        it empty, and read as one it costs a call per tier, not one per piece); without an
        estimate, it is halved while there are not windows enough to keep the budget busy to
        the end."""
        return self._owner.split(win, seen, pages)

    def now(self) -> datetime:
        return self._owner.clock()


class Splitting:
    """The pages of one window's listing, each counted as read: after a full first page, the
    window is offered for splitting (:meth:`_splits`); once split, the listing ends there
    (``split`` is then True) and the pieces read the rest. ``key``: the field naming a record,
    whose values the pieces are told were written (:attr:`Window.seen`), with ``seen_before``
    (those of the window's listing read before this one)."""

    def __init__(
        self,
        reading: Reading,
        win: Window,
        pages: Iterable[Page],
        *,
        key: str | None,
        read_before: int = 0,
        seen_before: Sequence[str] = (),
    ) -> None:
        self.reading = reading
        self.win = win
        self.pages = pages
        self.key = key
        self.read_before = read_before
        self.split = False
        self.read = 0
        # The ids read (of the first MAX_SEEN_PAGES pages): what the pieces are told, should
        # this window split (then, or at its next listing's first page).
        self.ids: list[str] = list(seen_before)

    def __iter__(self) -> Iterator[Page]:
        for page in self.pages:
            self.read += 1
            if self.read <= MAX_SEEN_PAGES:
                self.ids.extend(self._ids(page))
            self.reading.counted(len(page.items))
            yield page
            if self.read == 1 and not page.is_last and self._splits(page):
                self.split = True
                return

    def _splits(self, page: Page) -> bool:
        """Offer the window for splitting after its full first ``page``: when at most one
        page of it was read before (by its other tier), or when the pages read before (read
        again by the pieces) are at most a tenth of what the window is estimated to hold."""
        pages = estimate_pages(self.win, page, self.reading.now())
        if self.read_before > MAX_SEEN_PAGES:
            return False  # the pieces could not be told every id read before
        if self.read_before > 1 and (pages is None or 10 * self.read_before > pages.pages):
            return False
        return self.reading.split(self.win, self.ids, pages)

    def _ids(self, page: Page) -> list[str]:
        if self.key is None:
            return []
        return [
            str(item[self.key])
            for item in page.items
            if isinstance(item, dict) and isinstance(item.get(self.key), str)
        ]


# The timestamps ``min_ts`` may compare, in the order tried.
_STAMPS = ("created_time", "last_update_time")


@dataclass(frozen=True)
class Estimate:
    """What a window's full first page tells of it: how many ``pages`` it holds at that
    page's density, and at which end that page was (``newest_first``: its newest records)."""

    pages: float
    newest_first: bool


def estimate_pages(win: Window, page: Page, now: datetime) -> Estimate | None:
    """How many pages ``win`` holds, judged from its full first ``page``: where the page's
    records come sorted by a timestamp (newest first, as Kalshi lists; or oldest first), the
    span they cover gives the window's density. ``None`` where no timestamp is in order (the
    sort is unknown): the window is then halved instead. Only the speed of a load depends on
    this guess, never what it reads."""
    for field_name in _STAMPS:
        stamps = [_stamp(item, field_name) for item in page.items]
        if len(stamps) < 2 or None in stamps:
            continue
        known = [s for s in stamps if s is not None]
        descending = all(a >= b for a, b in zip(known, known[1:], strict=False))
        ascending = all(a <= b for a, b in zip(known, known[1:], strict=False))
        covered = abs((known[0] - known[-1]).total_seconds())
        if not (descending or ascending) or covered <= 0:
            continue
        lo, hi = win.span(now)
        return Estimate((hi - lo).total_seconds() / covered, newest_first=descending)
    return None


def _stamp(item: object, name: str) -> datetime | None:
    value = item.get(name) if isinstance(item, dict) else None
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Tier:
    """One listing of a window's records (its live tier, or its historical tier): its pages,
    opened when its turn comes (a tier read after another may depend on what that one
    listed), and what takes them (returns what it wrote)."""

    pages: Callable[[], Iterable[Page]]
    take: Callable[[Iterable[Page]], Counts]


def read_tiers(
    reading: Reading, win: Window, tiers: Iterable[Tier], *, key: str | None = None
) -> Counts | None:
    """Read ``win``'s listings in order, each to its end: its live tier, then its historical
    tier (read after: records only ever move live → historical, so none slips between the
    two). Each is a :class:`Splitting` told what the ones before it read (``key``: the field
    naming a record, see :class:`Splitting`). ``None`` when the window split (its pieces then
    read it), else what the tiers' takes wrote."""
    counts = Counts()
    read_before = 0
    seen_before: list[str] = []
    for tier in tiers:
        pages = Splitting(
            reading, win, tier.pages(), key=key, read_before=read_before, seen_before=seen_before
        )
        counts += tier.take(pages)
        if pages.split:
            return None
        read_before += pages.read
        seen_before = pages.ids
    return counts


# Reads one window to its end and records it done; returns what it wrote, or None when the
# window was split (its pieces then read it).
ReadWindow = Callable[[Window, Reading], Counts | None]


def _near(pieces: list[Window], near: int, *, newest_first: bool) -> list[Window]:
    """``pieces`` (oldest first), the ``near`` ones at the end the records were seen kept and
    the others joined into one."""
    if len(pieces) <= near + 1:
        return pieces
    if newest_first:
        far = pieces[: len(pieces) - near]
        return [Window(far[0].start, far[-1].end), *pieces[len(pieces) - near :]]
    far = pieces[near:]
    return [*pieces[:near], Window(far[0].start, far[-1].end)]


class _Scheduler:
    def __init__(
        self,
        clock: Callable[[], datetime],
        check_stop: Callable[[str], None],
        todo: Sequence[Window],
        read: ReadWindow,
        *,
        wanted: Callable[[], int],
        done: int,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.clock = clock
        self.check_stop = check_stop
        self.read = read
        self.wanted = wanted
        self.on_progress = on_progress
        self.queue: deque[Window] = deque(todo)
        self.running = 0
        self.lock = threading.Lock()
        self.done = done
        self.total = done + len(todo)
        self.records = 0
        self.splits = 0

    def report(self) -> None:
        if self.on_progress is not None:
            with self.lock:
                progress = BackfillProgress(self.done, self.total, self.records)
            self.on_progress(progress)

    def counted(self, fetched: int) -> None:
        with self.lock:
            self.records += fetched
        self.report()

    def split(self, win: Window, seen: Iterable[str], pages: Estimate | None) -> bool:
        with self.lock:
            if pages is None:
                if len(self.queue) + self.running >= SPLIT_AHEAD * self.wanted():
                    return False
                count = 2
            elif pages.pages > 2 * TARGET_PAGES:
                count = min(MAX_PIECES, math.ceil(pages.pages / TARGET_PAGES))
            else:
                return False
            pieces = win.pieces(count, self.clock())
            if pieces is None:
                return False
            if pages is not None:
                pieces = _near(pieces, max(2, self.wanted()), newest_first=pages.newest_first)
            extra = win.seen | frozenset(seen)
            self.queue.extend(Window(p.start, p.end, extra) for p in pieces)
            self.total += len(pieces) - 1
            self.splits += 1
        log.debug("window %s split in %d", win.label, len(pieces))
        return True

    def one(self, win: Window) -> Counts:
        self.check_stop("stopped before every window was read")
        counts = self.read(win, Reading(self))
        with self.lock:
            self.running -= 1
            if counts is not None:
                self.done += 1
        self.report()
        return counts or Counts()

    def take(self) -> Window | None:
        with self.lock:
            if not self.queue or self.running >= self.wanted():
                return None
            self.running += 1
            return self.queue.popleft()

    def execute(self) -> Counts:
        total = Counts()
        self.report()
        threads = max(MAX_WIDTH, self.wanted())
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="window") as pool:
            pending: set[Future[Counts]] = set()
            try:
                while True:
                    while (win := self.take()) is not None:
                        pending.add(pool.submit(self.one, win))
                    if not pending:
                        with self.lock:
                            if not self.queue:
                                break
                        continue  # pragma: no cover - windows queued, none running
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        total += future.result()
            except BaseException:
                for other in pending:
                    other.cancel()
                raise
        return total


def run_windows(
    run: Run,
    plan: Sequence[Window],
    spans: Sequence[tuple[int, int]],
    read: ReadWindow,
    *,
    concurrency: int | Callable[[], int],
    on_progress: ProgressCallback | None,
    scope: Scope = "backfill",
) -> Counts:
    """Read the parts of ``plan`` that ``spans`` (windows done before) leave, ``concurrency``
    at a time (a number, or a function asked before each window starts: :func:`width`);
    ``on_progress`` after each page and each window.

    Raises:
        StopRequested: ``run``'s stop was set (the windows done stay done).
        ApiError, DatabaseError: a window failed; the others are cancelled.
    """
    left = [uncovered(w, spans) for w in plan]
    done = sum(1 for pieces in left if not pieces)
    partly = sum(1 for w, pieces in zip(plan, left, strict=True) if pieces != [w])
    if partly:
        log.info(
            "%s resumes: %d of %d windows already done, %d partly",
            "backfill" if scope == "backfill" else "first load",
            done,
            len(plan),
            partly - done,
        )
    wanted = concurrency if callable(concurrency) else (lambda: max(1, int(concurrency)))
    scheduler = _Scheduler(
        run.clock,
        run.check_stop,
        [piece for pieces in left for piece in pieces],
        read,
        wanted=wanted,
        done=done,
        on_progress=on_progress,
    )
    total = scheduler.execute()
    if scheduler.splits:
        log.debug("%d window(s) split on a full first page", scheduler.splits)
    return total


def load_windows(
    run: Run,
    plan: Sequence[Window],
    spans: Sequence[tuple[int, int]],
    tiers: Callable[[Window, PageWriter], Iterable[Tier]],
    *,
    sink: Sink[Any],
    key: str | None = None,
    scope: Scope,
    concurrency: int | Callable[[], int],
    on_progress: ProgressCallback | None,
) -> Counts:
    """Load ``plan``'s windows that ``spans`` leave (:func:`run_windows`), each window's
    ``tiers`` read in turn (:func:`read_tiers`, their takes writing through the run's one page
    writer, handed to ``tiers``); a window read to its end is recorded done in ``scope`` by
    ``sink``'s checkpoint, in the transaction after its last page is committed."""
    with PageWriter(run) as writer:

        def read(win: Window, reading: Reading) -> Counts | None:
            counts = read_tiers(reading, win, tiers(win, writer), key=key)
            if counts is not None:
                done = Checkpoint(window=win.bounds, scope=scope)
                write_parsed(run, sink, [], [], checkpoint=done)
            return counts

        return run_windows(
            run, plan, spans, read, concurrency=concurrency, on_progress=on_progress, scope=scope
        )


def list_windows(
    client: KalshiClient,
    plan: Sequence[Window],
    tiers: Callable[[Window], Iterable[Tier]],
    *,
    clock: Callable[[], datetime],
) -> None:
    """Read ``plan``'s windows' ``tiers`` with no checkpoint (``verify``'s listing): as many
    windows at once as keep ``client``'s budget busy, split as a load's are."""

    def read(win: Window, reading: Reading) -> Counts | None:
        return read_tiers(reading, win, tiers(win))

    _Scheduler(
        clock, lambda what: None, plan, read, wanted=lambda: width(client), done=0, on_progress=None
    ).execute()


def logged_progress(label: str, run: Run, *, every: float = 5.0) -> ProgressCallback:
    """A progress callback that logs where a partitioned read stands, at most every
    ``every`` seconds: records read, their rate, windows done."""
    state = {"last": 0.0}
    lock = threading.Lock()

    def log_it(progress: BackfillProgress) -> None:
        now = time.monotonic()
        with lock:
            if now - state["last"] < every:
                return
            state["last"] = now
        seconds = max(now - run.started, 1e-9) if run.started else None
        rate = f" ({progress.records / seconds:,.0f}/s)" if seconds else ""
        log.info(
            "%s: %s records read%s, %d of %d windows done",
            label,
            f"{progress.records:,}",
            rate,
            progress.windows_done,
            progress.windows_total,
        )

    return log_it
