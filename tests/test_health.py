"""Operator endpoints over real HTTP: /metrics moves with the syncs and names routes, never
order ids; /readyz turns 503 while the API fails for three intervals and 200 once it answers
again, saying which stream and why; /healthz follows the loop; a daemon subprocess serving
them keeps `orders` and `queue_positions_current` equal to a trading simulator's truth."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from etl.health import Liveness, OperatorServer, Readiness
from etl.kalshi.auth import KalshiAuth
from etl.kalshi.client import KalshiClient, RetryPolicy
from etl.scheduler import run_daemon
from etl.simulator import Exchange, SimulatorApp, serve
from etl.simulator.keys import key_id
from etl.sync.orders import sync_orders
from etl.sync.queue import poll_queue_positions
from tests.fix_exchange import spawn, wait_until
from tests.sync.helpers import assert_table_equals_truth, current_queue_positions, queue_truth

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    answer = httpx.get(url, timeout=5)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def live_client(base_url: str, private_key, **options) -> KalshiClient:
    options.setdefault("tokens_per_second", 0)
    return KalshiClient(base_url, auth=KalshiAuth(key_id(private_key), private_key), **options)


@pytest.fixture
def account() -> str:
    """An account name of its own: metrics are per process, and this test reads deltas."""
    return f"acct-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def operator(db, account):
    liveness = Liveness()
    every = timedelta(seconds=0.3)
    readiness = Readiness(db, {(account, "orders"): every, (account, "queue_positions"): every})
    server = OperatorServer("127.0.0.1", 0, liveness=liveness, readiness=readiness)
    server.start()
    host, port = server.address
    yield f"http://{host}:{port}", liveness
    server.stop()


def test_metrics_move_after_a_sync_and_name_routes_not_ids(
    db, live_simulator, exchange, private_key, operator, account
):
    url, _ = operator
    client = live_client(live_simulator.base_url, private_key, page_size=50)
    before = scrape(url + "/metrics")
    first = sync_orders(db, client, account=account)
    poll_queue_positions(db, client, account=account)
    victim = exchange.resting_ids()[0]
    exchange.now += timedelta(minutes=1)
    exchange.cancel(victim)  # old: only a fetch by id settles it
    second = sync_orders(db, client, account=account)
    after = scrape(url + "/metrics")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    orders = {"account": account, "stream": "orders"}
    assert delta("kalshi_etl_runs_total", status="succeeded", **orders) == 2
    assert delta("kalshi_etl_rows_total", outcome="inserted", **orders) == first.counts.inserted
    assert delta("kalshi_etl_rows_total", outcome="updated", **orders) >= 1
    assert delta("kalshi_etl_run_duration_seconds_count", **orders) == 2
    assert value(after, "kalshi_etl_last_success_timestamp_seconds", **orders) > time.time() - 60
    lag = value(after, "kalshi_etl_watermark_lag_seconds", account=account, stream="orders")
    assert second.watermark is not None  # the frozen exchange's clock, days behind ours
    assert abs(lag - (time.time() - second.watermark.timestamp())) < 60
    resting = len(exchange.resting_ids()) + 1  # the poll ran before the cancel
    assert value(after, "kalshi_etl_open_orders", account=account) == resting
    assert delta("kalshi_etl_api_requests_total", endpoint="/portfolio/orders", status="200") > 0
    by_id = {"endpoint": "/portfolio/orders/{order_id}", "status": "200"}
    assert delta("kalshi_etl_api_requests_total", **by_id) >= 1
    labels = {v for _, pairs in after for _, v in pairs}
    assert not any(victim in label for label in labels)


def test_retries_and_rate_limit_waits_are_counted(
    db, live_simulator, private_key, operator, account
):
    url, _ = operator
    before = scrape(url + "/metrics")
    live_simulator.app.faults.error_rate = 1.0
    client = live_client(
        live_simulator.base_url,
        private_key,
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02),
        tokens_per_second=100,  # starts empty: each call waits about 0.1 s for its tokens
    )
    with pytest.raises(Exception, match="503"):
        next(client.iter_order_pages())
    after = scrape(url + "/metrics")
    assert (
        value(after, "kalshi_etl_api_retries_total", reason="5xx")
        - value(before, "kalshi_etl_api_retries_total", reason="5xx")
        == 2
    )
    endpoint = {"endpoint": "/portfolio/orders", "status": "503"}
    assert (
        value(after, "kalshi_etl_api_requests_total", **endpoint)
        - value(before, "kalshi_etl_api_requests_total", **endpoint)
        == 3
    )
    assert value(after, "kalshi_etl_rate_limit_wait_seconds_total") > value(
        before, "kalshi_etl_rate_limit_wait_seconds_total"
    )


def test_readyz_is_503_while_the_api_answers_500s_for_3_intervals_then_200(
    db, live_simulator, private_key, operator, account
):
    url, liveness = operator
    every = timedelta(seconds=0.3)
    client = live_client(
        live_simulator.base_url,
        private_key,
        page_size=100,
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, max_total=1),
    )
    stop = threading.Event()
    jobs = {
        "orders": (lambda s: sync_orders(db, client, account=account, lock_wait=0, stop=s), every),
        "queue_positions": (
            lambda s: poll_queue_positions(db, client, account=account, lock_wait=0, stop=s),
            every,
        ),
    }
    daemon = threading.Thread(
        target=run_daemon,
        args=(jobs,),
        kwargs={"stop": stop, "install_signals": False, "on_tick": liveness.beat},
    )
    daemon.start()
    try:
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=20)
        assert httpx.get(url + "/healthz").status_code == 200
        live_simulator.app.faults.error_status = 500
        live_simulator.app.faults.error_rate = 1.0
        failing_since = time.monotonic()
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 503, timeout=20)
        assert time.monotonic() - failing_since >= 2 * every.total_seconds()
        body = httpx.get(url + "/readyz").json()
        assert body["status"] == "not ready" and body["database"] == {"ok": True}
        late = [s for s in body["streams"] if not s["ok"]]
        assert late and all("500" in s["reason"] and s["account"] == account for s in late)
        assert httpx.get(url + "/healthz").status_code == 200  # alive, just not ready
        live_simulator.app.faults.error_rate = 0.0
        wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=20)
        assert httpx.get(url + "/readyz").json()["problems"] == []
    finally:
        stop.set()
        daemon.join(timeout=15)


def test_readyz_is_503_when_the_database_does_not_answer(account):
    dead = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:9/none")
    ready, body = Readiness(dead, {(account, "orders"): timedelta(seconds=1)}).check()
    assert not ready and not body["database"]["ok"]
    assert "does not answer" in body["database"]["error"]
    assert "127.0.0.1" not in str(body) and "postgres" not in str(body)  # no host, no user


def test_healthz_fails_once_the_loop_stops_beating():
    now = [0.0]
    liveness = Liveness(clock=lambda: now[0])
    assert liveness.alive()
    now[0] += 30
    assert not liveness.alive()
    liveness.beat()
    assert liveness.alive()


def test_a_port_in_use_is_a_one_line_config_error(db, account):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(Exception, match="cannot listen on 127.0.0.1"):
            OperatorServer(
                "127.0.0.1",
                taken.getsockname()[1],
                liveness=Liveness(),
                readiness=Readiness(db, {}),
            )
    finally:
        taken.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


def daemon_env(
    server: Any, private_key: Any, key_file: Path, database_url: str, home: Path, port: int
) -> dict[str, str]:
    """The environment of a daemon process on ``server`` with its metrics on ``port``."""
    return {
        "PATH": "/usr/bin:/bin",
        "KALSHI_API_BASE": f"http://127.0.0.1:{server.server_address[1]}/trade-api/v2",
        "KALSHI_API_KEY_ID": key_id(private_key),
        "KALSHI_PRIVATE_KEY_PATH": str(key_file),
        "KALSHI_READ_TOKENS_PER_SECOND": "0",
        "KALSHI_ETL_HOME": str(home),
        "KALSHI_ETL_METRICS_PORT": str(port),
        "DATABASE_URL": database_url,
        "PYTHONUNBUFFERED": "1",
    }


def wait_ready(proc: subprocess.Popen[str], url: str, timeout: float = 30) -> None:
    """Wait for the daemon's /readyz to answer 200; fail with its stderr if it does not."""

    def ready() -> bool:
        try:
            return httpx.get(url + "/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=timeout)
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.communicate()[1][-3000:]) from None


def in_step(db, exchange: Exchange) -> bool:
    try:
        assert_table_equals_truth(db, exchange)
    except AssertionError:
        return False
    return current_queue_positions(db) == queue_truth(exchange)


@pytest.mark.long  # about 10 s: trading for several seconds against a daemon process
def test_a_daemon_keeps_orders_and_queue_positions_equal_to_a_trading_exchange(
    db, private_key, key_file, database_url, tmp_path
):
    exchange = Exchange(
        seed=11, orders=400, api="2026", now=datetime.now(UTC), events_per_second=25
    )
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=True)
    server = serve(app)
    port = free_port()
    env = daemon_env(server, private_key, key_file, database_url, tmp_path, port)
    interval = 1.0
    proc = spawn(["daemon", "--orders-every", "1s", "--queue-every", "1s"], env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        runs_before = scrape(url + "/metrics")
        for _ in range(2):  # trade, then hold still: the tables catch up within two intervals
            time.sleep(2 * interval)
            app.pause()
            paused = time.monotonic()
            wait_until(lambda: in_step(db, exchange), timeout=2 * interval + 1.5)
            assert time.monotonic() - paused <= 2 * interval + 1.5
            app.resume()
        runs_after = scrape(url + "/metrics")
        key = "kalshi_etl_runs_total"
        moved = [k for k in runs_after if k[0] == key and runs_after[k] > runs_before.get(k, 0.0)]
        assert {dict(labels)["stream"] for _, labels in moved} == {"orders", "queue_positions"}
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert time.monotonic() - stopping < 10
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()


def _threads() -> int:
    return threading.active_count()


def test_half_open_connections_are_capped_and_timed_out_and_probes_still_answer(db):
    readiness = Readiness(db, {})
    liveness = Liveness()
    server = OperatorServer("127.0.0.1", 0, liveness=liveness, readiness=readiness)
    server.start()
    host, port = server.address
    before = _threads()
    sockets = []
    try:
        for _ in range(200):  # connect, send nothing
            sockets.append(socket.create_connection((host, port)))
        time.sleep(0.5)
        assert _threads() <= before + 16  # a handler thread per connection, up to a cap
        wait_until(lambda: _threads() <= before, timeout=10)  # every idle one timed out
        liveness.beat()
        assert httpx.get(f"http://{host}:{port}/healthz", timeout=5).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def test_readyz_never_shows_the_database_user_or_host(database_url):
    from tests.proxy import DatabaseProxy

    proxy = DatabaseProxy(database_url).start()
    url = sa.engine.make_url(proxy.proxied_url).set(username="someuser", password="s3cret")
    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    proxy.stop()  # the database goes away
    server = OperatorServer("127.0.0.1", 0, liveness=Liveness(), readiness=Readiness(engine, {}))
    server.start()
    host, port = server.address
    try:
        answer = httpx.get(f"http://{host}:{port}/readyz", timeout=10)
    finally:
        server.stop()
        engine.dispose()
    assert answer.status_code == 503
    assert answer.json()["database"]["ok"] is False
    for secret in ("someuser", "s3cret", "127.0.0.1", str(proxy.port)):
        assert secret not in answer.text
