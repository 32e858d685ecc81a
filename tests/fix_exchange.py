"""The simulated exchange for the tests: a seeded Exchange, a key pair, an in-process httpx
transport bound to it, and a real loopback server for end-to-end and CLI tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.pool import NullPool

from etl.kalshi.auth import KalshiAuth
from etl.kalshi.client import KalshiClient, RetryPolicy
from etl.simulator import Exchange, SimulatorApp, serve
from etl.simulator.keys import generate_key, key_id, private_pem
from tests.fix_db import empty_tables

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
BASE = "http://simulator.test/trade-api/v2"


@pytest.fixture(scope="session")
def private_key() -> rsa.RSAPrivateKey:
    return generate_key()


@pytest.fixture(scope="session")
def key_file(private_key: rsa.RSAPrivateKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "kalshi.pem"
    path.write_bytes(private_pem(private_key))
    path.chmod(0o600)
    return path


@pytest.fixture
def exchange() -> Exchange:
    """300 orders over 60 days, 2026 shapes, frozen in time until a test moves it."""
    return Exchange(seed=1, orders=300, api="2026", now=NOW, events_per_second=0)


@pytest.fixture
def app(exchange: Exchange, private_key: rsa.RSAPrivateKey) -> SimulatorApp:
    return SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)


class Sleeps(list[float]):
    """A sleep that records instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


WsgiApp = Callable[..., Any]


def rewriting(app: WsgiApp, rewrite: Callable[[httpx.Request, Any], Any]) -> httpx.MockTransport:
    """A transport answering like ``app``, with each JSON body passed through ``rewrite``."""

    def handle(request: httpx.Request) -> httpx.Response:
        answer = httpx.WSGITransport(app=app).handle_request(request)
        answer.read()
        try:
            body = answer.json()
        except ValueError:
            return httpx.Response(answer.status_code, content=answer.content)
        return httpx.Response(answer.status_code, json=rewrite(request, body))

    return httpx.MockTransport(handle)


def make_client(
    app: WsgiApp | httpx.MockTransport,
    key: rsa.RSAPrivateKey,
    *,
    page_size: int | Literal["auto"] = 50,
    sleep: Callable[[float], None] | None = None,
    tokens_per_second: float = 0,
) -> KalshiClient:
    transport = app if isinstance(app, httpx.MockTransport) else httpx.WSGITransport(app=app)
    return KalshiClient(
        BASE,
        auth=KalshiAuth(key_id(key), key),
        transport=transport,
        page_size=page_size,
        tokens_per_second=tokens_per_second,
        retry=RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, max_total=5),
        sleep=sleep if sleep is not None else Sleeps(),
    )


@pytest.fixture
def client(app: SimulatorApp, private_key: rsa.RSAPrivateKey) -> Iterator[KalshiClient]:
    """A signed client talking to ``app`` in-process through httpx's WSGI transport."""
    with make_client(app, private_key) as c:
        yield c


@dataclass
class LiveSimulator:
    app: SimulatorApp
    base_url: str
    env: dict[str, str]


@pytest.fixture
def live_simulator(
    app: SimulatorApp, private_key: rsa.RSAPrivateKey, key_file: Path, database_url: str
) -> Iterator[LiveSimulator]:
    """``app`` served over real HTTP on loopback, with the environment a CLI process needs,
    on emptied tables (the simulator's key refuses a database holding other accounts)."""
    empty_database(database_url)
    server = serve(app)
    host, port = server.server_address[0], server.server_address[1]
    base = f"http://{host!s}:{port}/trade-api/v2"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KALSHI", "DATABASE"))},
        "KALSHI_API_BASE": base,
        "KALSHI_API_KEY_ID": key_id(private_key),
        "KALSHI_PRIVATE_KEY_PATH": str(key_file),
        "KALSHI_READ_TOKENS_PER_SECOND": "0",
        "KALSHI_PAGE_SIZE": "50",
        "KALSHI_ETL_HOME": os.environ["KALSHI_ETL_HOME"],
        "DATABASE_URL": database_url,
        "PYTHONUNBUFFERED": "1",
    }
    yield LiveSimulator(app=app, base_url=base, env=env)
    server.shutdown()
    server.server_close()


CLI = [sys.executable, "-m", "etl"]


def empty_database(database_url: str) -> None:
    """Empty every table of the test database at ``database_url``."""
    engine = sa.create_engine(database_url, poolclass=NullPool)
    try:
        empty_tables(engine)
    finally:
        engine.dispose()


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``kalshi-etl ARGS`` in the background, its output captured as text."""
    return subprocess.Popen(
        [*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_until(condition: Callable[[], bool], *, timeout: float = 30, poll: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(poll)


# -- several accounts on one simulator ------------------------------------------------------


@pytest.fixture(scope="session")
def account_keys(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[rsa.RSAPrivateKey, Path]]:
    """Six key pairs and their PEM files, one per simulated account."""
    folder = tmp_path_factory.mktemp("account-keys")
    keys = []
    for number in range(6):
        key = generate_key()
        path = folder / f"account{number}.pem"
        path.write_bytes(private_pem(key))
        path.chmod(0o600)
        keys.append((key, path))
    return keys


@dataclass
class SimAccount:
    """One simulated account: its name in the tables, its key and its exchange."""

    name: str
    key: rsa.RSAPrivateKey
    key_path: Path
    exchange: Exchange


def accounts_app(accounts: list[SimAccount], **options: Any) -> SimulatorApp:
    """One simulator serving every account, each key reading its own exchange."""
    return SimulatorApp(
        accounts[0].exchange,
        {key_id(a.key): a.key.public_key() for a in accounts},
        exchanges={key_id(a.key): a.exchange for a in accounts},
        **options,
    )


def sim_accounts(
    keys: list[tuple[rsa.RSAPrivateKey, Path]], count: int, **exchange_options: Any
) -> list[SimAccount]:
    """``count`` accounts named ``acct-1``…, each on an exchange of its own seed (so their
    order ids differ)."""
    return [
        SimAccount(
            f"acct-{n}", key, path, Exchange(seed=100 + n, **{"api": "2026", **exchange_options})
        )
        for n, (key, path) in enumerate(keys[:count], 1)
    ]


def write_accounts_file(path: Path, accounts: list[SimAccount], base_url: str) -> Path:
    """The accounts TOML naming each account's key and the simulator."""
    entries = [
        f'[[account]]\nname = "{a.name}"\nkey_id = "{key_id(a.key)}"\n'
        f'private_key_path = "{a.key_path}"\napi_base = "{base_url}"\n'
        "read_tokens_per_second = 0\n"
        for a in accounts
    ]
    path.write_text("\n".join(entries))
    return path


@dataclass
class LiveAccounts:
    """Several accounts served over real HTTP, and the environment a CLI process needs."""

    app: SimulatorApp
    base_url: str
    accounts: list[SimAccount]
    env: dict[str, str]


@contextlib.contextmanager
def serve_accounts(
    accounts: list[SimAccount], folder: Path, database_url: str, **options: Any
) -> Iterator[LiveAccounts]:
    empty_database(database_url)
    app = accounts_app(accounts, **options)
    server = serve(app)
    host, port = server.server_address[0], server.server_address[1]
    base = f"http://{host!s}:{port}/trade-api/v2"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KALSHI", "DATABASE"))},
        "KALSHI_ETL_ACCOUNTS": str(write_accounts_file(folder / "accounts.toml", accounts, base)),
        "KALSHI_PAGE_SIZE": "50",
        "KALSHI_ETL_HOME": os.environ["KALSHI_ETL_HOME"],
        "DATABASE_URL": database_url,
        "PYTHONUNBUFFERED": "1",
    }
    try:
        yield LiveAccounts(app=app, base_url=base, accounts=accounts, env=env)
    finally:
        server.shutdown()
        server.server_close()
