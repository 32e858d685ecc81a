"""Replicas share the work: N daemons on one database run every (account, stream) job, never
two runs of one job at once, and take over a dead replica's jobs within an interval."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime

import pytest

from tests.fix_exchange import serve_accounts, sim_accounts, wait_until
from tests.soak.driver import Process, Supervisor, overlapping_runs
from tests.sync.helpers import assert_table_equals_truth, current_queue_positions, queue_truth

INTERVAL = 1.0


def _first_successes_since(db, since: datetime) -> dict[tuple[str, str], float]:
    """Per (account, stream): seconds from ``since`` to the start of its first successful run
    that started after it."""
    with db.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT account, stream, min(started_at) AS first FROM sync_runs "
            "WHERE status = 'succeeded' AND started_at >= %s GROUP BY account, stream",
            (since,),
        ).all()
    return {(r.account, r.stream): (r.first - since).total_seconds() for r in rows}


@pytest.mark.slow
@pytest.mark.long
def test_three_replicas_share_the_jobs_take_over_from_dead_ones_and_converge(
    db, database_url, tmp_path, account_keys
):
    accounts = sim_accounts(account_keys, 3, orders=150, events_per_second=5)
    keys = {(a.name, s) for a in accounts for s in ("orders", "queue_positions")}
    with serve_accounts(accounts, tmp_path, database_url) as live:
        supervisor = Supervisor(live.env, tmp_path)
        every = ["--orders-every", f"{INTERVAL:g}s", "--queue-every", f"{INTERVAL:g}s"]
        streams = ["--streams", "orders,queue_positions"]  # the jobs `keys` names
        replicas = [Process(f"daemon-{n}", ["daemon", *streams, *every]) for n in range(1, 4)]
        try:
            for replica in replicas:
                supervisor.add(replica)
            started = datetime.now(UTC)
            wait_until(lambda: _first_successes_since(db, started).keys() == keys, timeout=60)
            time.sleep(2 * INTERVAL)  # a few rounds of all three trying every job

            for replica in replicas[:2]:  # two of three die, mid-run or not
                assert replica.popen is not None
                replica.popen.send_signal(signal.SIGKILL)
                replica.popen.wait()
            killed = datetime.now(UTC)
            wait_until(lambda: _first_successes_since(db, killed).keys() == keys, timeout=30)
            takeover = max(_first_successes_since(db, killed).values())
            # Each job's next turn comes within an interval (plus its random shift of up to
            # 10% and a little scheduling): the survivor is not blocked by the dead ones' locks.
            assert takeover <= INTERVAL * 1.1 + 0.75, takeover

            live.app.pause()
            time.sleep(3 * INTERVAL + 1)
            for account in accounts:
                assert_table_equals_truth(db, account.exchange, account.name)
            positions = current_queue_positions(db)
            truth = {k: v for a in accounts for k, v in queue_truth(a.exchange).items()}
            assert positions == truth

            survivor = replicas[2]
            code, took = supervisor.stop(survivor)
            assert code == 0 and took < 10
        finally:
            supervisor.close()
    assert overlapping_runs(db) == []
    with db.connect() as conn:
        by_status = dict(
            conn.exec_driver_sql("SELECT status, count(*) FROM sync_runs GROUP BY status").all()
        )
    # The two killed replicas left at most one run each per job running; the survivor's next
    # run of that job closed it as interrupted.
    assert by_status.get("running", 0) == 0
    assert by_status["succeeded"] > 4 * len(keys)


def _list_calls(app) -> int:
    return sum(
        1
        for path, _ in list(app.requests)
        if path.endswith(("/portfolio/orders", "/historical/orders", "/queue_positions"))
    )


def _calls_made_by(supervisor, replicas, app, seconds: float) -> int:
    for replica in replicas:
        supervisor.add(replica)
    time.sleep(2.0)  # start-up, and each replica's first look at the shared record
    before = _list_calls(app)
    time.sleep(seconds)
    made = _list_calls(app) - before
    for replica in replicas:
        code, _ = supervisor.stop(replica)
        assert code == 0
    return made


@pytest.mark.slow
@pytest.mark.long
def test_two_replicas_make_about_the_api_calls_of_one(db, database_url, tmp_path, account_keys):
    accounts = sim_accounts(account_keys, 1, orders=150, events_per_second=5)
    # Intervals long beside a run, as in production (30 s and 10 s against runs of a few
    # hundred milliseconds): replicas on their own schedules would rarely meet at a lock.
    every = ["--orders-every", "2s", "--queue-every", "2s"]
    with serve_accounts(accounts, tmp_path, database_url) as live:
        supervisor = Supervisor(live.env, tmp_path)
        try:
            one = _calls_made_by(supervisor, [Process("alone", ["daemon", *every])], live.app, 10)
            two = _calls_made_by(
                supervisor,
                [Process(f"pair-{n}", ["daemon", *every]) for n in (1, 2)],
                live.app,
                10,
            )
        finally:
            supervisor.close()
    assert one > 0
    assert two <= 1.3 * one, (one, two)
    assert overlapping_runs(db) == []
