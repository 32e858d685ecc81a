"""The daemon runs both jobs on their intervals, survives a failing job, and on SIGTERM
finishes the page in flight, commits and exits 0."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import timedelta

import pytest

from etl.errors import ApiTransportError, LockBusyError
from etl.scheduler import run_daemon
from tests.fix_exchange import spawn, wait_until
from tests.sync.helpers import assert_table_equals_truth, runs


def test_jobs_run_on_their_intervals_and_a_failing_job_does_not_stop_the_daemon():
    stop = threading.Event()
    calls: dict[str, int] = {"fast": 0, "failing": 0, "busy": 0}

    def job(name: str, error: Exception | None = None):
        def run(_stop: threading.Event) -> None:
            calls[name] += 1
            if error is not None:
                raise error

        return run

    threading.Timer(1.3, stop.set).start()
    code = run_daemon(
        {
            "fast": (job("fast"), timedelta(seconds=0.25)),
            "failing": (job("failing", ApiTransportError("down")), timedelta(seconds=0.25)),
            "busy": (job("busy", LockBusyError("held")), timedelta(seconds=0.25)),
        },
        stop=stop,
        install_signals=False,
    )
    assert code == 0
    assert calls["fast"] >= 3 and calls["failing"] >= 3 and calls["busy"] >= 3


def test_a_long_interval_job_runs_first_at_once_and_is_tried_at_most_max_tick_apart():
    stop = threading.Event()
    calls: list[float] = []

    def hourly(_stop: threading.Event) -> None:
        calls.append(1)

    threading.Timer(1.2, stop.set).start()
    run_daemon(
        {"hourly": (hourly, timedelta(hours=1))},
        stop=stop,
        install_signals=False,
        ticks=4,
        max_tick=0.25,
    )
    # The first try within FIRST_SPREAD (not a tenth of a 15-minute tick), then every 0.25 s.
    assert len(calls) >= 3


def test_a_job_failure_is_one_log_line_without_a_traceback(caplog):
    stop = threading.Event()

    def broken(_stop: threading.Event) -> None:
        stop.set()
        raise RuntimeError("the database went away")

    with caplog.at_level(logging.INFO):
        run_daemon({"broken": (broken, timedelta(seconds=1))}, stop=stop, install_signals=False)
    failures = [r for r in caplog.records if "broken failed" in r.getMessage()]
    assert len(failures) == 1 and not failures[0].exc_info
    assert "RuntimeError: the database went away" in failures[0].getMessage()


@pytest.mark.slow
def test_sigterm_stops_the_daemon_cleanly_with_exit_0(db, live_simulator, exchange):
    live_simulator.app.faults.latency = 0.02
    proc = spawn(
        [
            "daemon",
            "--streams",
            "orders,queue_positions",
            "--orders-every",
            "1s",
            "--queue-every",
            "1s",
        ],
        live_simulator.env,
    )
    wait_until(lambda: sum(r.status == "succeeded" for r in runs(db)) >= 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "daemon stopped" in stderr and "Traceback" not in stderr
    assert all(r.status != "running" for r in runs(db))
    assert {r.stream for r in runs(db)} == {"orders", "queue_positions"}
    assert_table_equals_truth(db, exchange)
