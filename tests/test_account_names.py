"""One key, one account name: a key already synced under another name is refused (exit 2, one
line naming both names and the rename), `kalshi-etl accounts rename OLD NEW` moves every row in
one transaction, after which settle, the queue poll and `verify --repair` converge; and the
simulator's key never writes beside a real account's data unless asked to."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl.db.models import metadata
from etl.simulator.keys import key_id
from etl.streams.settlements import SETTLEMENTS
from etl.sync.listing import sync_listing
from etl.sync.orders import sync_orders
from etl.sync.queue import poll_queue_positions
from etl.sync.verify import verify_orders
from tests.fix_exchange import CLI
from tests.sync.helpers import assert_table_equals_truth, count

pytestmark = pytest.mark.slow


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def accounts_env(env: dict[str, str], tmp_path: Path, name: str, key_file: Path) -> dict:
    path = tmp_path / "accounts.toml"
    path.write_text(
        f'[[account]]\nname = "{name}"\nkey_id = "{env["KALSHI_API_KEY_ID"]}"\n'
        f'private_key_path = "{key_file}"\napi_base = "{env["KALSHI_API_BASE"]}"\n'
        "read_tokens_per_second = 0\n"
    )
    path.chmod(0o600)
    return {**env, "KALSHI_ETL_ACCOUNTS": str(path)}


@pytest.mark.long  # about 7 s: several CLI processes
def test_a_key_synced_under_another_name_is_refused_until_renamed(
    db, tmp_path, live_simulator, key_file, exchange
):
    env = live_simulator.env
    key = env["KALSHI_API_KEY_ID"]
    assert run(["sync"], env, tmp_path).returncode == 0  # the environment: account = key id
    stored = count(db, "SELECT count(*) FROM orders")
    moved_env = accounts_env(env, tmp_path, "main", key_file)

    line = one_line(run(["sync"], moved_env, tmp_path), 2)
    assert f"'{key}'" in line and "'main'" in line
    assert f"kalshi-etl accounts rename {key} main" in line
    assert count(db, "SELECT count(*) FROM orders WHERE account = 'main'") == 0

    renamed = run(["accounts", "rename", key, "main"], moved_env, tmp_path)
    assert renamed.returncode == 0, renamed.stderr
    assert renamed.stdout.startswith(f"renamed account {key} to main")
    for table in metadata.sorted_tables:
        if "account" in table.c:
            assert count(db, f"SELECT count(*) FROM {table.name} WHERE account = '{key}'") == 0
    assert count(db, "SELECT count(*) FROM orders WHERE account = 'main'") == stored

    # Under the one name, an order that fills is settled, and verify finds nothing to repair.
    resting = exchange.resting_ids()[0]
    exchange.fill(resting, exchange.order(resting).initial)
    assert run(["sync"], moved_env, tmp_path).returncode == 0
    assert_table_equals_truth(db, exchange, "main")
    assert run(["verify"], moved_env, tmp_path).returncode == 0


def test_a_database_split_between_two_names_converges_after_the_rename(
    db, tmp_path, live_simulator, key_file, exchange, client
):
    key = live_simulator.env["KALSHI_API_KEY_ID"]
    # What b6abd03 let happen: the key synced under its id, then under a new name.
    sync_orders(db, client, account=key)
    poll_queue_positions(db, client, account=key)
    sync_orders(db, client, account="main")
    resting = exchange.resting_ids()[0]
    exchange.fill(resting, exchange.order(resting).initial)
    sync_orders(db, client, account="main")
    # The review's symptom: the filled order stays resting under the old name.
    with db.connect() as conn:
        status = conn.execute(
            sa.text("SELECT status FROM orders WHERE order_id = :id"), {"id": resting}
        ).scalar_one()
    assert status == "resting"

    env = accounts_env(live_simulator.env, tmp_path, "main", key_file)
    line = one_line(run(["verify", "--repair"], env, tmp_path), 2)
    assert f"kalshi-etl accounts rename {key} main" in line
    assert run(["accounts", "rename", key, "main"], env, tmp_path).returncode == 0
    assert run(["sync"], env, tmp_path).returncode == 0
    assert_table_equals_truth(db, exchange, "main")
    assert run(["verify"], env, tmp_path).returncode == 0


def test_a_repair_claims_orders_stored_under_another_name_and_converges(
    db, client, exchange, private_key
):
    sync_orders(db, client, account="old-name")
    before = verify_orders(db, client, account="new-name")
    assert before.before.counts["stale"] == count(db, "SELECT count(*) FROM orders")

    repaired = verify_orders(db, client, account="new-name", repair=True)

    assert repaired.after is not None and repaired.after.equal, repaired.after
    assert verify_orders(db, client, account="new-name").equal
    assert count(db, "SELECT count(*) FROM orders WHERE account = 'old-name'") == 0


def test_renaming_to_a_name_already_in_use_keeps_one_state_row_per_stream(
    db, client, exchange, tmp_path
):
    exchange.settle_market(exchange.tickers[0], "yes")
    for name in ("old", "new"):
        sync_orders(db, client, account=name)
        sync_listing(db, client, SETTLEMENTS, account=name)  # the same rows under both names
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KALSHI", "DATABASE"))},
        "DATABASE_URL": db.url.render_as_string(hide_password=False),
        "KALSHI_ETL_HOME": str(tmp_path / "home"),
    }
    result = run(["accounts", "rename", "old", "new"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert count(db, "SELECT count(*) FROM sync_state WHERE account = 'old'") == 0
    assert count(db, "SELECT count(*) FROM sync_runs WHERE account = 'new'") == 4
    assert count(db, "SELECT count(*) FROM settlements WHERE account = 'old'") == 0
    line = one_line(run(["accounts", "rename", "old", "new"], env, tmp_path), 2)
    assert "no rows of account 'old'" in line


def test_the_simulators_key_is_refused_where_a_real_account_has_data(
    db, tmp_path, live_simulator, private_key
):
    with db.begin() as conn:  # a real account synced here before
        conn.execute(
            sa.text(
                "INSERT INTO sync_state (account, stream, watermark, state, updated_at) VALUES "
                "('trader', 'account:key', NULL, "
                '\'{"key_id": "a952bcbe-0000-4000-8000-000000000001"}\', now()), '
                "('trader', 'orders', now(), '{}', now())"
            )
        )
    env = live_simulator.env
    for command in (["sync"], ["verify"], ["backfill", "--since", "2026-01-01"]):
        line = one_line(run(command, env, tmp_path), 2)
        assert "real Kalshi account (trader)" in line and key_id(private_key) in line
        assert "--allow-simulated" in line
    assert count(db, "SELECT count(*) FROM orders") == 0

    forced = run(["sync", "--allow-simulated"], env, tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert count(db, "SELECT count(*) FROM orders") > 0
