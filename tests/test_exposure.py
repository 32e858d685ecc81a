"""Nothing exposed: no log level prints a signature, a key or a password; psql gets the
password in its environment, not on its command line; an inline private key in a file others
can read is warned about; `status --account` with a name no one knows is an error."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from etl.simulator import Exchange, SimulatorApp, serve
from etl.simulator.keys import key_id, private_pem
from tests.fix_exchange import CLI, spawn, wait_until
from tests.test_health import daemon_env, free_port

# An RSA-2048 signature is 344 characters of base64; no log line may carry one.
_SIGNATURE_VALUE = re.compile(r"[A-Za-z0-9+/]{300,}={0,2}")


def run(args: list[str], env: dict[str, str], cwd: Path | None = None):
    return subprocess.run(
        [*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_debug_logs_of_a_realtime_daemon_never_carry_a_signature(
    db, private_key, key_file, database_url, tmp_path
):
    exchange = Exchange(seed=3, orders=50, now=datetime.now(UTC), events_per_second=5)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()})
    server = serve(app)
    env = {
        **daemon_env(server, private_key, key_file, database_url, tmp_path, free_port()),
        "KALSHI_ETL_REALTIME": "1",
    }
    proc = spawn(["daemon", "--debug", "--orders-every", "1s"], env)
    try:
        wait_until(lambda: app.stream.subscribers() == 1, timeout=20)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
        server.shutdown()
        server.server_close()
    assert "user_orders+fill+market_positions stream subscribed" in stderr
    assert "DEBUG" in stderr  # the debug level was on
    assert not _SIGNATURE_VALUE.search(stderr), _SIGNATURE_VALUE.search(stderr)
    assert "-----BEGIN" not in stderr
    for line in stderr.splitlines():
        if "kalshi-access-signature" in line.lower():
            assert "[redacted]" in line, line


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_psql_gets_the_password_in_its_environment_not_on_its_command_line(database_url, tmp_path):
    password = "pw-not-for-argv-7f3a"
    url = make_url(database_url).set(password=password).render_as_string(hide_password=False)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KALSHI", "DATABASE"))},
        "DATABASE_URL": url,
        "KALSHI_ETL_HOME": str(tmp_path / "home"),
    }
    proc = subprocess.Popen(
        [*CLI, "psql", "-c", "SELECT pg_sleep(3)"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: bool(_children(proc.pid)), timeout=20)
        [child] = _children(proc.pid)
        argv = Path(f"/proc/{child}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{child}/environ").read_bytes().decode()
        assert "psql" in argv
        assert password not in argv
        assert f"PGPASSWORD={password}" in environ.split("\0")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert password not in out + err


def test_an_inline_private_key_in_a_file_others_can_read_is_warned_about(
    database_url, private_key, tmp_path
):
    accounts = tmp_path / "accounts.toml"
    pem = private_pem(private_key).decode()
    accounts.write_text(
        f'[[account]]\nname = "inline"\nkey_id = "{key_id(private_key)}"\n'
        f'private_key = """{pem}"""\napi_base = "http://127.0.0.1:9/trade-api/v2"\n'
    )
    accounts.chmod(0o644)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KALSHI", "DATABASE"))},
        "DATABASE_URL": database_url,
        "KALSHI_ETL_HOME": str(tmp_path / "home"),
        "KALSHI_ETL_ACCOUNTS": str(accounts),
    }
    result = run(["sync", "--no-queue"], env, tmp_path)
    assert f"{accounts} holds a private key and is readable by group or others" in result.stderr
    assert "-----BEGIN" not in result.stderr

    accounts.chmod(0o600)
    result = run(["sync", "--no-queue"], env, tmp_path)
    assert "readable by group or others" not in result.stderr

    # The same for KALSHI_PRIVATE_KEY in ./.env
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        f"KALSHI_API_KEY_ID={key_id(private_key)}\n"
        f"KALSHI_API_BASE=http://127.0.0.1:9/trade-api/v2\n"
        f'KALSHI_PRIVATE_KEY="{pem}"\n'
    )
    dotenv.chmod(0o644)
    env.pop("KALSHI_ETL_ACCOUNTS")
    result = run(["sync", "--no-queue"], env, tmp_path)
    assert ".env holds a private key and is readable by group or others" in result.stderr


def test_status_with_an_unknown_account_name_is_one_line_and_exit_2(database_url, tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KALSHI", "DATABASE"))},
        "DATABASE_URL": database_url,
        "KALSHI_ETL_HOME": str(tmp_path / "home"),
    }
    result = run(["status", "--account", "no-such-acount-typo"], env, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-acount-typo" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
