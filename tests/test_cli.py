"""The command line as users and scripts see it: exit codes, one line on stderr that says what
to fix, no traceback, no secret; `simulate` up in under 2 s and answering signed requests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etl.cli import _PULLING, build_parser
from etl.kalshi.auth import KalshiAuth
from etl.kalshi.client import KalshiClient
from etl.simulator.keys import load_or_create
from tests.fix_exchange import CLI, NOW, serve_accounts, sim_accounts, spawn, wait_until
from tests.sync.helpers import assert_table_equals_truth, count

pytestmark = pytest.mark.slow


def run(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KALSHI", "DATABASE"))}
    env["KALSHI_ETL_HOME"] = str(tmp_path / "home")
    return env


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], code: int, *needles: str
) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_missing_key_is_one_line_and_exit_2(tmp_path, database_url):
    env = {**base_env(tmp_path), "DATABASE_URL": database_url, "KALSHI_API_KEY_ID": "k"}
    assert_one_line_error(run(["sync"], env, tmp_path), 2, "KALSHI_PRIVATE_KEY_PATH is not set")


def test_missing_credentials_are_one_line_and_exit_2(tmp_path, database_url):
    env = {**base_env(tmp_path), "DATABASE_URL": database_url}
    assert_one_line_error(run(["sync"], env, tmp_path), 2, "KALSHI_API_KEY_ID is not set")


def test_a_bad_key_file_is_one_line_and_exit_2(tmp_path, database_url):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)
    env = {
        **base_env(tmp_path),
        "DATABASE_URL": database_url,
        "KALSHI_API_KEY_ID": "k",
        "KALSHI_PRIVATE_KEY_PATH": str(bad),
    }
    result = run(["sync"], env, tmp_path)
    assert_one_line_error(result, 2, str(bad), "not a PEM private key")
    assert "not really" not in result.stderr


def test_an_unreadable_key_file_is_one_line_and_exit_2(tmp_path, database_url):
    env = {
        **base_env(tmp_path),
        "DATABASE_URL": database_url,
        "KALSHI_API_KEY_ID": "k",
        "KALSHI_PRIVATE_KEY_PATH": str(tmp_path),
    }
    assert_one_line_error(run(["sync"], env, tmp_path), 2, "is a directory")


def test_a_bad_duration_is_one_line_and_exit_2(tmp_path):
    env = {**base_env(tmp_path), "KALSHI_ETL_LOOKBACK": "5 minutes"}
    assert_one_line_error(run(["status"], env, tmp_path), 2, "KALSHI_ETL_LOOKBACK")


def test_a_bad_flag_is_one_line_and_exit_2(tmp_path):
    assert_one_line_error(
        run(["sync", "--sideways"], base_env(tmp_path), tmp_path),
        2,
        "unrecognized arguments: --sideways",
    )


def test_a_bad_backfill_time_is_one_line_and_exit_2(tmp_path, key_file, database_url):
    env = {**base_env(tmp_path), "DATABASE_URL": database_url}
    assert_one_line_error(run(["backfill", "--since", "last week"], env, tmp_path), 2, "--since")


def test_an_unreachable_database_is_one_line_exit_2_with_the_password_masked(tmp_path):
    env = {**base_env(tmp_path), "DATABASE_URL": "postgresql://bob:hunter2@127.0.0.1:9/kalshi"}
    result = run(["migrate"], env, tmp_path)
    assert_one_line_error(result, 2, "cannot connect to the database", "127.0.0.1:9")
    assert "hunter2" not in result.stderr


def test_a_wrong_key_is_exit_2_with_the_api_message(tmp_path, live_simulator, database_url):
    other = load_or_create(tmp_path / "other.pem")
    env = {**live_simulator.env, "KALSHI_PRIVATE_KEY_PATH": str(tmp_path / "other.pem")}
    result = run(["sync"], env, tmp_path)
    assert result.returncode == 2
    assert "401" in result.stderr and "invalid signature" in result.stderr
    assert other.public_key() is not None


def test_sync_status_and_migrate_from_any_directory(db, tmp_path, live_simulator, exchange):
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    assert run(["migrate"], live_simulator.env, elsewhere).returncode == 0
    result = run(["sync"], live_simulator.env, elsewhere)
    assert result.returncode == 0, result.stderr
    assert_table_equals_truth(db, exchange)
    status = run(["status"], live_simulator.env, elsewhere)
    assert status.returncode == 0
    assert "orders (account" in status.stdout and "queue_positions (account" in status.stdout
    assert "succeeded" in status.stdout
    key_text = Path(live_simulator.env["KALSHI_PRIVATE_KEY_PATH"]).read_text()
    body = key_text.splitlines()[1]
    for output in (result.stdout, result.stderr, status.stdout, status.stderr):
        assert body not in output


def test_told_no_budget_a_sync_reads_the_keys_own_and_says_it(db, live_simulator, exchange):
    env = {k: v for k, v in live_simulator.env.items() if k != "KALSHI_READ_TOKENS_PER_SECOND"}
    result = run(["sync", "--streams", "orders"], env)
    assert result.returncode == 0, result.stderr
    # The simulator enforces no limit and says so as Kalshi's top tier.
    assert "read budget: 10000 tokens/s (prestige tier, bucket of 20000)" in result.stderr
    assert_table_equals_truth(db, exchange)


def test_json_logs_are_one_object_per_line(db, tmp_path, live_simulator):
    env = {**live_simulator.env, "KALSHI_ETL_LOG_FORMAT": "json"}
    result = run(["sync", "--streams", "orders"], env, tmp_path)
    assert result.returncode == 0
    import json

    entries = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert entries and all({"time", "level", "logger", "message"} <= e.keys() for e in entries)
    [summary] = [e for e in entries if "run_id" in e]
    assert summary["stream"] == "orders" and summary["account"] == env["KALSHI_API_KEY_ID"]
    assert summary["status"] == "succeeded" and summary["error"] is None
    assert summary["inserted"] > 0 and summary["fetched"] >= summary["inserted"]
    assert {"updated", "unchanged", "rejected"} <= summary.keys()
    assert isinstance(summary["duration_ms"], int)


def test_prune_keeps_each_orders_latest_snapshot(db, tmp_path, live_simulator):
    assert run(["sync"], live_simulator.env, tmp_path).returncode == 0
    with db.begin() as conn:  # two old rows for one order: the older is superseded
        for days, ahead in ((200, 2), (150, 1)):
            conn.exec_driver_sql(
                "INSERT INTO queue_position_snapshots (order_id, account, market_ticker, "
                f"queue_position, captured_at) SELECT order_id, account, market_ticker, "
                f"queue_position + {ahead}, captured_at - interval '{days} days' "
                "FROM queue_position_snapshots ORDER BY order_id, captured_at DESC LIMIT 1"
            )
    rows = count(db, "SELECT count(*) FROM queue_position_snapshots")
    result = run(["prune", "--snapshots-older-than", "90d"], live_simulator.env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pruned 1 queue-position snapshot(s)")
    assert count(db, "SELECT count(*) FROM queue_position_snapshots") == rows - 1


def test_simulate_starts_in_under_two_seconds_and_answers_a_signed_request(tmp_path):
    env = base_env(tmp_path)
    started = time.monotonic()
    proc = spawn(["simulate", "--port", "0", "--orders", "500"], env)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        elapsed = time.monotonic() - started
        settings = dict(line.split("=", 1) for line in lines)
        assert set(settings) == {"KALSHI_API_BASE", "KALSHI_API_KEY_ID", "KALSHI_PRIVATE_KEY_PATH"}
        assert elapsed < 2.0, elapsed
        key = load_or_create(Path(settings["KALSHI_PRIVATE_KEY_PATH"]))
        with KalshiClient(
            settings["KALSHI_API_BASE"], auth=KalshiAuth(settings["KALSHI_API_KEY_ID"], key)
        ) as client:
            page = next(client.iter_order_pages())
        assert page.items and all("order_id" in o for o in page.items)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)  # drains and closes the pipes
    assert proc.returncode == 0


def test_python_dash_m_etl_is_the_same_program():
    result = subprocess.run(
        [sys.executable, "-m", "etl", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("kalshi-etl ")


def test_the_demo_runs_against_the_simulator_and_ends_up_to_date(db, tmp_path, database_url):
    env = {**base_env(tmp_path), "DATABASE_URL": database_url}
    result = run(["demo", "--cycles", "1"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "every one up to date" in result.stdout
    assert "residual $0.00" in result.stdout  # the cash check of the simulated account
    page = next(line for line in result.stdout.splitlines() if "the money, as a page" in line)
    assert Path(page.split(": ", 1)[1].split(" (")[0]).is_file()
    assert "WARNING" not in result.stderr


@pytest.mark.long  # the demo twice: about 15 s
def test_a_second_demo_starts_again_from_clean_simulated_data(db, tmp_path, database_url):
    env = {**base_env(tmp_path), "DATABASE_URL": database_url}
    for _ in range(2):
        result = run(["demo", "--cycles", "2"], env, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "every one up to date" in result.stdout
        assert "WARNING" not in result.stderr


def test_the_demo_never_mixes_into_a_real_accounts_data(db, tmp_path, database_url):
    from etl.db.state import write_state

    with db.begin() as conn:
        write_state(conn, "a-real-account", "orders", watermark=None)
    result = run(["demo"], {**base_env(tmp_path), "DATABASE_URL": database_url}, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("kalshi-etl: error")]
    assert len(errors) == 1 and "holds data of a real Kalshi account" in errors[0]
    with db.connect() as conn:  # untouched
        assert (
            conn.exec_driver_sql("SELECT account FROM sync_state").scalar_one() == "a-real-account"
        )


def test_an_interrupted_backfill_commits_stops_and_resumes(db, tmp_path, live_simulator, exchange):
    import signal

    live_simulator.app.faults.latency = 0.05
    args = ["backfill", "--since", "2026-09-01", "--window", "2d", "--concurrency", "2"]
    proc = spawn(args, live_simulator.env)
    wait_until(  # at least one window done, so that there is something to resume
        lambda: count(db, "SELECT count(*) FROM sync_state WHERE stream = 'orders:backfill'") > 0
    )
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    live_simulator.app.faults.latency = 0
    resumed = run(args, live_simulator.env, tmp_path)  # no --until: "now" has moved on
    assert resumed.returncode == 0, resumed.stderr
    assert "backfill resumes:" in resumed.stderr
    assert "backfill: " in resumed.stderr and "ETA" in resumed.stderr  # plain progress lines
    assert_table_equals_truth(db, exchange)
    assert "backfill (fills) " in resumed.stdout  # fills too, by default
    with db.connect() as conn:
        fills = conn.exec_driver_sql("SELECT fill_id FROM fills").scalars().all()
    assert sorted(fills) == sorted(f.fill_id for f in exchange.ledger.fills())


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["daemon", "--orders-every", "0s"], {}, "--orders-every: expected a duration above zero"),
        (["daemon", "--queue-every", "-5s"], {}, "--queue-every"),
        (["backfill", "--since", "2026-01-01", "--window", "0s"], {}, "--window"),
        (["backfill", "--since", "2026-01-01", "--window", "-1d"], {}, "--window"),
        (["simulate", "--port", "99999"], {}, "--port: expected a value from 0 to 65535"),
        (["simulate", "--orders", "-5"], {}, "--orders"),
        (["daemon", "--metrics-port", "http"], {}, "--metrics-port"),
        (["daemon"], {"KALSHI_ETL_METRICS_PORT": "99999"}, "KALSHI_ETL_METRICS_PORT"),
        (["prune"], {}, "--snapshots-older-than"),
        (["prune", "--snapshots-older-than", "soon"], {}, "--snapshots-older-than"),
        (["sync"], {"KALSHI_PAGE_SIZE": "big"}, "KALSHI_PAGE_SIZE: expected auto"),
        (["backfill", "--since", "1738324800000"], {}, "looks like milliseconds"),
        (["status"], {"KALSHI_API_BASE": "https://api.elections.kalshi.com"}, "/trade-api/v2"),
        (["status"], {"DATABASE_URL": "postgresql://u@localhost:abc/db"}, "port 'abc'"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(tmp_path, key_file, args, env, needle):
    full = {
        **base_env(tmp_path),
        "DATABASE_URL": "postgresql://u@127.0.0.1:9/nowhere",
        "KALSHI_API_KEY_ID": "k",
        "KALSHI_PRIVATE_KEY_PATH": str(key_file),
        **env,
    }
    assert_one_line_error(run(args, full, tmp_path), 2, needle)


def test_an_unreachable_api_is_reported_once_and_fast(
    tmp_path, key_file, private_key, database_url
):
    from etl.simulator.keys import key_id

    env = {
        **base_env(tmp_path),
        "DATABASE_URL": database_url,
        "KALSHI_API_BASE": "http://127.0.0.1:9/trade-api/v2",
        "KALSHI_API_KEY_ID": key_id(private_key),
        "KALSHI_PRIVATE_KEY_PATH": str(key_file),
    }
    started = time.monotonic()
    result = run(["sync"], env, tmp_path)
    assert result.returncode == 1 and time.monotonic() - started < 8
    failures = [line for line in result.stderr.splitlines() if "sync failed:" in line]
    assert len(failures) == 1 and "orders sync failed" in failures[0]
    assert "cannot reach the Kalshi API at 127.0.0.1" in failures[0]
    [skipped] = [line for line in result.stderr.splitlines() if "not tried" in line]
    assert "queue positions" in skipped and "not tried: the API cannot be reached" in skipped
    assert "Traceback" not in result.stderr


def test_status_exits_1_when_a_stream_failed_or_is_older_than_max_age(db, tmp_path, live_simulator):
    env = live_simulator.env
    assert run(["sync"], env, tmp_path).returncode == 0
    healthy = run(["status", "--max-age", "1h"], env, tmp_path)
    assert healthy.returncode == 0 and "health      ok" in healthy.stdout
    stale = run(["status", "--max-age", "1ms"], env, tmp_path)
    assert stale.returncode == 1 and "no successful run for" in stale.stdout
    down = {**env, "KALSHI_API_BASE": "http://127.0.0.1:9/trade-api/v2"}
    assert run(["sync", "--no-queue"], down, tmp_path).returncode == 1
    failed = run(["status"], env, tmp_path)
    assert failed.returncode == 1
    assert "UNHEALTHY: orders (account" in failed.stdout and "failed: cannot reach" in failed.stdout
    assert "database    " in failed.stdout and "kalshi-etl psql" in failed.stdout


def test_psql_opens_the_database(db, tmp_path, live_simulator):
    assert run(["sync"], live_simulator.env, tmp_path).returncode == 0
    result = run(["psql", "-At", "-c", "SELECT count(*) > 0 FROM orders"], live_simulator.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "t"


@pytest.mark.long  # about 10 s: waits for a request that hangs
def test_sigterm_ends_a_daemon_stuck_on_a_silent_api_within_10_seconds(tmp_path, database_url):
    import signal
    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = silent.getsockname()[1]
    key = load_or_create(tmp_path / "key.pem")
    from etl.simulator.keys import key_id

    env = {
        **base_env(tmp_path),
        "DATABASE_URL": database_url,
        "KALSHI_API_BASE": f"http://127.0.0.1:{port}/trade-api/v2",
        "KALSHI_API_KEY_ID": key_id(key),
        "KALSHI_PRIVATE_KEY_PATH": str(tmp_path / "key.pem"),
    }
    proc = spawn(["daemon"], env)
    try:
        silent.settimeout(30)
        conn, _ = silent.accept()  # the orders job is now waiting on its request
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert time.monotonic() - started < 10
        assert proc.returncode == 0, stderr
        assert "did not finish within" in stderr and "Traceback" not in stderr
        conn.close()
    finally:
        proc.kill()
        silent.close()


def test_the_demo_ignores_credentials_in_dotenv_and_recovers_from_its_leftovers(
    db, tmp_path, database_url
):
    from etl.db.state import write_state

    with db.begin() as conn:  # a `kalshi-etl simulate` account synced by an earlier try
        write_state(conn, "sim-0000-left-over", "orders", watermark=None)
    (tmp_path / ".env").write_text(  # what `kalshi-etl simulate > .env` leaves
        "KALSHI_API_BASE=http://127.0.0.1:9/trade-api/v2\n"
        "KALSHI_API_KEY_ID=sim-gone\n"
        f"KALSHI_PRIVATE_KEY_PATH={tmp_path / 'gone.pem'}\n"
    )
    result = run(
        ["demo", "--cycles", "1"], {**base_env(tmp_path), "DATABASE_URL": database_url}, tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "ignoring the Kalshi credentials in ./.env" in result.stdout
    assert "demo: API       the built-in simulator at http://127.0.0.1:" in result.stdout
    assert "demo: database  " in result.stdout
    assert "every one up to date" in result.stdout


@pytest.fixture
def two_accounts(db, database_url, tmp_path, account_keys):
    accounts = sim_accounts(account_keys, 2, orders=120, now=NOW, events_per_second=0)
    with serve_accounts(accounts, tmp_path, database_url, advance=False) as live:
        yield live


def test_account_selects_one_account_of_the_accounts_file(db, tmp_path, two_accounts):
    first, second = two_accounts.accounts
    result = run(["sync", "--account", first.name], two_accounts.env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert_table_equals_truth(db, first.exchange, first.name)
    assert count(db, f"SELECT count(*) FROM orders WHERE account = '{second.name}'") == 0
    result = run(["sync"], two_accounts.env, tmp_path)  # without --account: every account
    assert result.returncode == 0, result.stderr
    assert_table_equals_truth(db, second.exchange, second.name)
    status = run(["status", "--account", second.name], two_accounts.env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"orders (account {second.name})" in status.stdout
    assert f"account {first.name}" not in status.stdout


def test_an_unknown_account_is_a_one_line_error_naming_the_accounts(tmp_path, two_accounts):
    result = run(["verify", "--account", "nope"], two_accounts.env, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"kalshi-etl: error: --account nope: no such account in "
        f"{two_accounts.env['KALSHI_ETL_ACCOUNTS']}; the accounts are: acct-1, acct-2"
    )


@pytest.mark.long  # about 10 s: five verify processes over two accounts
def test_verify_exits_0_when_equal_1_with_the_differences_listed_and_repairs(
    db, tmp_path, two_accounts
):
    first, _ = two_accounts.accounts
    assert run(["sync"], two_accounts.env, tmp_path).returncode == 0
    equal = run(["verify"], two_accounts.env, tmp_path)
    assert equal.returncode == 0, equal.stdout + equal.stderr
    assert equal.stdout.count("equal: every listed order is in orders") == 2
    gone = first.exchange.resting_ids()[0]
    with db.begin() as conn:
        conn.exec_driver_sql("DELETE FROM orders WHERE order_id = %s", (gone,))
    differs = run(["verify", "--account", first.name], two_accounts.env, tmp_path)
    assert differs.returncode == 1
    assert f"1 missing (listed, not in orders): {gone}" in differs.stdout
    assert "DIFFERENT (--repair writes what differs)" in differs.stdout
    repaired = run(["verify", "--repair", "--account", first.name], two_accounts.env, tmp_path)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repaired: inserted 1, updated 0" in repaired.stdout
    assert_table_equals_truth(db, first.exchange, first.name)

    # Per stream: a fill lost makes `verify` of fills exit 1, the other streams stay equal.
    with db.begin() as conn:
        fill = conn.exec_driver_sql(
            "SELECT min(fill_id) FROM fills WHERE account = %s", (first.name,)
        ).scalar_one()
        conn.exec_driver_sql("DELETE FROM fills WHERE fill_id = %s", (fill,))
    env, on = two_accounts.env, ["--account", first.name, "--streams"]
    fills = run(["verify", *on, "fills"], env, tmp_path)
    assert fills.returncode == 1 and fill in fills.stdout, fills.stdout + fills.stderr
    others = run(["verify", *on, "orders,settlements"], env, tmp_path)
    assert others.returncode == 0, others.stdout + others.stderr


def test_the_commands_that_pull_are_commands():
    """They hand the GIL over more often (etl.sync.orders.SWITCH_INTERVAL): a renamed command
    would silently lose it."""
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    assert _PULLING <= set(commands.choices or ())


def test_the_cli_starts_without_the_orm():
    """Every command pays its imports before it does anything: the schema is Core tables, so
    ``sqlalchemy.orm`` (about 0.1 s) stays out of every start."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, etl.cli; print('sqlalchemy.orm' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "False"
