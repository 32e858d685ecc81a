"""Test configuration: fixture plugins, and an environment cleaned of the developer's own
Kalshi and database settings so that no test reaches a real account by accident."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fix_db", "tests.fix_exchange"]

_SCRUBBED = (
    "DATABASE_URL",
    "KALSHI_API_BASE",
    "KALSHI_API_KEY_ID",
    "KALSHI_PRIVATE_KEY_PATH",
    "KALSHI_PRIVATE_KEY",
    "KALSHI_READ_TOKENS_PER_SECOND",
    "KALSHI_PAGE_SIZE",
    "KALSHI_ETL_LOOKBACK",
    "KALSHI_ETL_LOG_FORMAT",
    "KALSHI_ETL_HOME",
    "KALSHI_ETL_REALTIME",
    "KALSHI_ETL_METRICS_PORT",
    "KALSHI_ETL_ACCOUNTS",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KALSHI_ETL_HOME", str(tmp_path_factory.mktemp("home")))
