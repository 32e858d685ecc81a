"""Backfill: a one-off load of [since, until) cut into windows fetched several at once, each
window recorded as done (by its own bounds, in the stream's ``<stream>:backfill`` state row,
in the transaction of its last page) once read to its end, so that a rerun, whatever its
``until``, skips what is done and resumes the rest. Stream-agnostic: the caller says how one
window is read (orders: :func:`etl.sync.orders.backfill_orders`; a listing such as fills:
:func:`etl.sync.listing.backfill_listing`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from etl.db.upsert import Counts
from etl.sync.run import Run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """A half-open time range [start, end) of a backfill, fetched as one unit."""

    start: datetime
    end: datetime

    @property
    def bounds(self) -> tuple[int, int]:
        """[start, end) in Unix seconds: the key the window is checkpointed by."""
        return math.floor(self.start.timestamp()), math.ceil(self.end.timestamp())


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
    return Window(
        max(win.start, datetime.fromtimestamp(lo, UTC)),
        min(win.end, datetime.fromtimestamp(hi, UTC)),
    )


@dataclass(frozen=True)
class BackfillProgress:
    """Where a backfill stands, for a progress display."""

    windows_done: int
    windows_total: int
    records: int  # fetched so far


ProgressCallback = Callable[[BackfillProgress], None]


# Reads one window to its end and records it done: (window, counted) → what it wrote;
# ``counted(n)`` after each page of n records.
ReadWindow = Callable[[Window, Callable[[int], None]], Counts]


def run_windows(
    run: Run,
    plan: Sequence[Window],
    spans: Sequence[tuple[int, int]],
    read: ReadWindow,
    *,
    concurrency: int,
    on_progress: ProgressCallback | None,
) -> Counts:
    """Read the parts of ``plan`` that ``spans`` (what earlier backfills did) leave,
    ``concurrency`` at a time; ``on_progress`` after each page and each window.

    Raises:
        StopRequested: ``run``'s stop was set (the windows done stay done).
        ApiError, DatabaseError: a window failed; the others are cancelled.
    """
    left = [uncovered(w, spans) for w in plan]
    done = sum(1 for pieces in left if not pieces)
    partly = sum(1 for w, pieces in zip(plan, left, strict=True) if pieces != [w])
    if partly:
        log.info(
            "backfill resumes: %d of %d windows already done, %d partly",
            done,
            len(plan),
            partly - done,
        )
    todo = [piece for pieces in left for piece in pieces]
    lock = threading.Lock()
    state = {"done": done, "records": 0}

    def report() -> None:
        if on_progress is not None:
            on_progress(BackfillProgress(state["done"], done + len(todo), state["records"]))

    def counted(fetched: int) -> None:
        with lock:
            state["records"] += fetched
        report()

    def one(win: Window) -> Counts:
        run.check_stop("stopped before every window was fetched")
        counts = read(win, counted)
        with lock:
            state["done"] += 1
        report()
        return counts

    total = Counts()
    report()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        pending: set[Future[Counts]] = {pool.submit(one, w) for w in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    total += future.result()
        except BaseException:
            for other in pending:
                other.cancel()
            raise
    return total
