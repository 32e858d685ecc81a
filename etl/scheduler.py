"""The daemon: APScheduler runs the orders sync and the queue poll on their intervals.

Each job runs at most one instance at a time (a late run is coalesced, never stacked). On
SIGINT/SIGTERM the stop event is set: a running job finishes the page in flight, commits it
and ends; the scheduler shuts down and :func:`run_daemon` returns 0. A failing job is logged
and tried again at its next interval; a busy lock (another process syncing the same account)
skips the turn.
"""

from __future__ import annotations

import logging
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


def _guarded(name: str, job: Job, stop: threading.Event) -> Callable[[], None]:
    def run() -> None:
        if stop.is_set():
            return
        try:
            job(stop)
        except LockBusyError as exc:
            log.info("%s skipped: %s", name, exc)
        except StopRequested:
            log.info("%s stopped after committing its page in flight", name)
        except EtlError as exc:
            log.error("%s failed: %s", name, exc)
        except Exception:
            log.exception("%s failed unexpectedly", name)

    return run


def run_daemon(
    jobs: dict[str, tuple[Job, timedelta]],
    *,
    stop: threading.Event | None = None,
    install_signals: bool = True,
) -> int:
    """Run ``jobs`` (name → (job, interval)) until ``stop`` is set or a signal arrives.

    Returns:
        0 once every running job has ended cleanly.
    """
    stop = stop or threading.Event()

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
        scheduler.add_job(
            _guarded(name, job, stop),
            "interval",
            seconds=every.total_seconds(),
            next_run_time=now,
            id=name,
            name=name,
        )
        log.info("scheduled %s every %s", name, every)
    scheduler.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        scheduler.shutdown(wait=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("daemon stopped")
    return 0
