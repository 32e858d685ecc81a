"""The daemon: APScheduler runs the orders sync and the queue poll on their intervals.

Each job runs at most one instance at a time (a late run is coalesced, never stacked). On
SIGINT/SIGTERM the stop event is set: a running job finishes the page in flight, commits it
and ends; the scheduler shuts down and :func:`run_daemon` returns 0. A job still running after
``grace`` seconds (a request stuck in the network) is left behind: ``on_stuck`` is called, so
that the process can exit at once; its run is closed as interrupted by the next one. A failing
job is logged on one line (the traceback only at DEBUG level) and tried again at its next
interval; a busy lock (another process syncing the same account) skips the turn.

Replicas: several daemons on one database try every job several times per interval
(``ticks``); the job runs only when it is due by the shared record (no run of it started
within its interval, in any replica), and its non-blocking lock lets one run it while the
others skip. So N replicas make about the API calls of one. Each job's tries are shifted by a
random fraction (``spread``) of a tick, so that replicas started together do not race for the
same lock. A replica that dies releases its locks with its connections and starts no more
runs: another finds its jobs due at most a tick after their interval.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from etl.errors import EtlError, LockBusyError, StopRequested

log = logging.getLogger(__name__)

Job = Callable[[threading.Event], object]


class _Running:
    """How many jobs are running; lets the stop wait for them, up to a grace period."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


def _guarded(name: str, job: Job, stop: threading.Event, running: _Running) -> Callable[[], None]:
    skipping = False  # in a streak of skipped turns: said once at INFO, then at DEBUG

    def run() -> None:
        nonlocal skipping
        if stop.is_set():
            return
        with running:
            try:
                job(stop)
                skipping = False
            except LockBusyError as exc:
                level = logging.DEBUG if skipping else logging.INFO
                skipping = True
                log.log(level, "%s skipped: %s", name, exc, extra={"stream": name})
            except StopRequested:
                log.info("%s stopped after committing its page in flight", name)
            except EtlError as exc:
                log.error("%s failed: %s", name, exc, extra={"stream": name, "error": str(exc)})
            except Exception as exc:
                log.error(
                    "%s failed unexpectedly: %s: %s (a bug: please report it; --debug shows "
                    "the traceback)",
                    name,
                    type(exc).__name__,
                    exc,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                    extra={"stream": name, "error": f"{type(exc).__name__}: {exc}"},
                )

    return run


FIRST_SPREAD = 2.0  # seconds: the most a job's first run is shifted by


def run_daemon(
    jobs: dict[str, tuple[Job, timedelta]],
    *,
    stop: threading.Event | None = None,
    install_signals: bool = True,
    grace: float = 8.0,
    on_stuck: Callable[[], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    spread: float = 0.1,
    ticks: int = 1,
    max_tick: float | None = None,
) -> int:
    """Run ``jobs`` (name → (job, interval)) until ``stop`` is set or a signal arrives.
    ``on_tick`` is called every half second while the scheduler runs (a liveness beat);
    ``spread`` is the fraction of each tick its runs are shifted by at random; ``ticks`` is
    how many times per interval a job is tried (jobs that check a shared record of their last
    start, so that replicas share them, are tried more often than they run); ``max_tick``
    caps the seconds between two tries (a job that failed is then retried that soon, whatever
    its interval, where the job's own check allows it).

    Returns:
        0 once every running job has ended (or, after ``grace`` seconds, been left behind).
    """
    stop = stop or threading.Event()
    running = _Running()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info(
            "received %s: finishing the page in flight, then exiting", signal.Signals(signum).name
        )
        stop.set()

    previous = {}
    if install_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=max(2, len(jobs)))},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone=UTC,
    )
    now = datetime.now(UTC)
    for name, (job, every) in jobs.items():
        tick = every.total_seconds() / ticks
        if max_tick is not None:
            tick = min(tick, max_tick)
        shift = tick * spread
        scheduler.add_job(
            _guarded(name, job, stop, running),
            "interval",
            seconds=tick,
            jitter=shift or None,
            # The first run soon whatever the interval (readiness waits for it), still shifted
            # a little so that replicas started together do not race for the lock.
            next_run_time=now + timedelta(seconds=random.uniform(0, min(shift, FIRST_SPREAD))),
            id=name,
            name=name,
        )
        log.info("scheduled %s every %s", name, every)
    scheduler.start()
    if on_tick is not None:
        on_tick()
    try:
        while not stop.wait(0.5):
            if on_tick is not None and scheduler.running:
                on_tick()
    finally:
        stop.set()
        scheduler.shutdown(wait=False)
        finished = running.wait_idle(grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not finished:
        log.warning(
            "a job did not finish within %.0fs of the stop; exiting anyway (the pages it "
            "committed stay, its run is closed as interrupted by the next one)",
            grace,
        )
        if on_stuck is not None:
            on_stuck()
    log.info("daemon stopped")
    return 0
