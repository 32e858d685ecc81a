"""`kalshi-etl daemon --realtime` (here through KALSHI_ETL_REALTIME) as a process: a trading
exchange's changes reach `orders`, and its fills `fills`, within a second with REST held back
to its catch-ups, /metrics and /readyz show the stream, and SIGTERM ends it cleanly.
/readyz's judgement of a stream that stays down is checked in-process, on a fake clock."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime

import httpx
import pytest

from etl import metrics
from etl.health import LINK_GRACE, Readiness
from etl.simulator import Exchange, SimulatorApp, serve
from etl.simulator.keys import key_id
from tests.fix_exchange import spawn, wait_until
from tests.sync.helpers import count
from tests.sync.test_realtime import fills_table, fills_truth, streamed_table, streamed_truth
from tests.test_health import daemon_env, free_port, scrape, value, wait_ready


@pytest.mark.long  # about 8 s: a daemon process trading for three seconds
def test_a_realtime_daemon_keeps_orders_within_a_second_of_a_trading_exchange(
    db, private_key, key_file, database_url, tmp_path
):
    exchange = Exchange(seed=12, orders=300, now=datetime.now(UTC), events_per_second=40)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()})
    server = serve(app)
    port = free_port()
    account = key_id(private_key)
    env = {
        **daemon_env(server, private_key, key_file, database_url, tmp_path, port),
        "KALSHI_ETL_REALTIME": "1",
    }
    proc = spawn(["daemon", "--orders-every", "1s", "--realtime-rest-every", "1h"], env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        wait_until(lambda: app.stream.subscribers() == 1, timeout=10)
        rest_runs = "SELECT count(*) FROM sync_runs WHERE stream = 'orders'"
        wait_until(lambda: count(db, rest_runs) >= 1, timeout=10)  # the catch-up
        time.sleep(0.5)
        before = count(db, rest_runs)

        lags = []
        for _ in range(3):  # trade for a second, stop: orders catches up within a second
            time.sleep(1.0)
            app.pause()
            paused = time.monotonic()
            with app.lock:
                truth = streamed_truth(exchange)
                fills = fills_truth(exchange)
            wait_until(lambda: streamed_table(db) == truth, timeout=5, poll=0.01)  # noqa: B023
            wait_until(lambda: fills_table(db) == fills, timeout=5, poll=0.01)  # noqa: B023
            lags.append(time.monotonic() - paused)
            app.resume()
        assert max(lags) < 1.0, lags
        assert count(db, rest_runs) == before, "REST ran between catch-ups: the stream did not"

        body = httpx.get(url + "/readyz").json()
        link = next(s for s in body["streams"] if s["stream"] == "user_orders")
        assert link["ok"] and link["connected"] and link["account"] == account
        samples = scrape(url + "/metrics")
        assert value(samples, "kalshi_etl_stream_connected", account=account) == 1
        written = sum(
            v for (name, _), v in samples.items() if name == "kalshi_etl_stream_messages_total"
        )
        assert written >= 20
        assert value(samples, "kalshi_etl_stream_lag_seconds_count", account=account) >= 20

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert "user_orders+fill+market_positions stream subscribed" in stderr
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()


def test_readyz_fails_once_the_stream_stays_down_past_the_grace(db):
    account = "acct-link"
    now = [time.time()]
    readiness = Readiness(db, {}, links=[account, "acct-never-started"], clock=lambda: now[0])

    def entry(name: str) -> dict:
        ready, body = readiness.check()
        return next(s for s in body["streams"] if s["account"] == name)

    assert entry("acct-never-started")["reason"] == "not started"
    metrics.stream_starting(account)
    assert entry(account)["ok"]  # connecting: within the grace
    metrics.stream_connected(account)
    now[0] += 3600
    assert entry(account)["ok"]  # connected: however long ago
    metrics.stream_dropped(account, "the connection dropped without a close frame")
    now[0] = time.time() + LINK_GRACE - 1
    assert entry(account)["ok"]  # reconnecting
    now[0] = time.time() + LINK_GRACE + 5
    down = entry(account)
    assert not down["ok"]
    assert "not connected for" in down["reason"] and "without a close frame" in down["reason"]
    ready, body = readiness.check()
    assert not ready and any("user_orders stream of acct-link" in p for p in body["problems"])
