"""The daemon comes up by itself after a reboot or a failover: a database that does not answer
yet, or an API that cannot be reached yet, is waited for (not ready meanwhile), never an exit 2
that a service manager would take for a configuration error; a real configuration error still
exits 2 at once."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from etl.simulator import serve
from tests.fix_exchange import spawn, wait_until
from tests.proxy import DatabaseProxy
from tests.sync.helpers import count
from tests.test_health import daemon_env, free_port

pytestmark = pytest.mark.slow


def readyz(url: str) -> tuple[int, dict]:
    answer = httpx.get(url + "/readyz", timeout=5)
    return answer.status_code, answer.json()


def wait_not_ready(url: str) -> None:
    """Wait for the daemon's health server to answer, not ready."""

    def answering() -> bool:
        try:
            return readyz(url)[0] == 503
        except httpx.TransportError:
            return False

    wait_until(answering, timeout=20)


@pytest.mark.long  # about 10 s: the database comes up only after a few seconds
def test_the_daemon_waits_for_a_database_that_is_not_up_yet(
    db, app, private_key, key_file, database_url, tmp_path
):
    proxy = DatabaseProxy(database_url)
    proxy.port = free_port()  # where the database will answer, once it is up
    server = serve(app)
    metrics_port = free_port()
    env = daemon_env(server, private_key, key_file, proxy.proxied_url, tmp_path, metrics_port)
    proc = spawn(["daemon", "--orders-every", "1s", "--queue-every", "1s"], env)
    url = f"http://127.0.0.1:{metrics_port}"
    try:
        wait_not_ready(url)
        status, body = readyz(url)
        assert body["database"]["ok"] is False
        text = str(body)
        assert "postgres@" not in text and "127.0.0.1" not in text and "5432" not in text
        time.sleep(3)  # several attempts: still running, not exited
        assert proc.poll() is None, proc.communicate()

        proxy.start()  # the database comes up
        wait_until(lambda: readyz(url)[0] == 200, timeout=30)
        assert count(db, "SELECT count(*) FROM orders") > 0

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        warnings = [line for line in stderr.splitlines() if "waiting for it" in line]
        assert len(warnings) == 1, stderr  # one line for the whole wait, not one per attempt
        assert "the database answers, after" in stderr
        assert "Traceback" not in stderr
    finally:
        proc.kill()
        proxy.stop()
        server.shutdown()
        server.server_close()


def test_sigterm_ends_the_wait_for_the_database_with_exit_0(
    app, private_key, key_file, database_url, tmp_path
):
    proxy = DatabaseProxy(database_url)
    proxy.port = free_port()  # never started
    server = serve(app)
    env = daemon_env(server, private_key, key_file, proxy.proxied_url, tmp_path, free_port())
    proc = spawn(["daemon"], env)
    try:
        time.sleep(2.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()


@pytest.mark.long  # about 35 s: the failed first runs are retried after RETRY_FAILED
def test_the_daemon_waits_for_an_api_that_cannot_be_reached_yet(
    db, app, private_key, key_file, database_url, tmp_path
):
    api_port = free_port()
    metrics_port = free_port()

    class Later:  # the simulator's address, before it listens
        server_address = ("127.0.0.1", api_port)

    env = daemon_env(Later(), private_key, key_file, database_url, tmp_path, metrics_port)
    every = ["--orders-every", "1s", "--queue-every", "1s", "--fills-every", "1s"]
    every += ["--settlements-every", "1s", "--positions-every", "1s", "--balance-every", "1s"]
    proc = spawn(["daemon", *every, "--cash-every", "1s"], env)
    url = f"http://127.0.0.1:{metrics_port}"
    server = None
    try:
        wait_not_ready(url)
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
        server = serve(app, port=api_port)
        wait_until(lambda: readyz(url)[0] == 200, timeout=30)
        assert count(db, "SELECT count(*) FROM orders") > 0
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
    finally:
        proc.kill()
        if server is not None:
            server.shutdown()
            server.server_close()


def test_a_bad_database_url_still_exits_2_at_once(app, private_key, key_file, tmp_path):
    server = serve(app)
    env = daemon_env(server, private_key, key_file, "postgresql://u@h:notaport/db", tmp_path, 0)
    env.pop("KALSHI_ETL_METRICS_PORT")
    proc = spawn(["daemon"], env)
    try:
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
