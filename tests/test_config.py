"""Configuration: CONTRACT.md's variables and defaults, durations and times, and errors that
name the variable and what it expected."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from etl.config import (
    DEMO_API_BASE,
    PRODUCTION_API_BASE,
    environment,
    from_env,
    parse_duration,
    parse_time,
    read_dotenv,
)
from etl.errors import ConfigError


def test_defaults_follow_the_contract():
    settings = from_env({})
    assert settings.database_url is None
    assert settings.api_base == PRODUCTION_API_BASE
    assert settings.read_tokens_per_second is None  # the key's budget, asked of the API
    assert settings.page_size == "auto"
    assert settings.metrics_port is None
    assert settings.lookback == timedelta(minutes=5)
    assert settings.log_format == "text"
    assert settings.home == Path("~/.kalshi-etl").expanduser()
    assert not settings.has_credentials


def test_page_size_is_auto_or_a_number_and_the_metrics_port_a_port():
    assert from_env({"KALSHI_PAGE_SIZE": "AUTO"}).page_size == "auto"
    assert from_env({"KALSHI_PAGE_SIZE": "200"}).page_size == 200
    assert from_env({"KALSHI_ETL_METRICS_PORT": "9464"}).metrics_port == 9464


def test_demo_targets_the_demo_environment():
    assert (
        from_env({"KALSHI_API_BASE": "http://x/trade-api/v2"}, demo=True).api_base == DEMO_API_BASE
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgres://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
    ],
)
def test_a_plain_postgresql_url_means_psycopg_3(url, expected):
    assert from_env({"DATABASE_URL": url}).database_url == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("250ms", 0.25)],
)
def test_durations(text, expected):
    assert parse_duration(text) == timedelta(seconds=expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-31", datetime(2025, 1, 31, tzinfo=UTC)),
        ("2025-01-31T12:00:00Z", datetime(2025, 1, 31, 12, tzinfo=UTC)),
        ("2025-01-31T12:00:00+01:00", datetime(2025, 1, 31, 11, tzinfo=UTC)),
        ("1738324800", datetime(2025, 1, 31, 12, tzinfo=UTC)),
    ],
)
def test_times(text, expected):
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KALSHI_ETL_LOOKBACK": "5 minutes"}, "KALSHI_ETL_LOOKBACK: expected a duration"),
        (
            {"KALSHI_PAGE_SIZE": "5000"},
            "KALSHI_PAGE_SIZE: expected auto or an integer from 1 to 1000",
        ),
        ({"KALSHI_PAGE_SIZE": "ten"}, "KALSHI_PAGE_SIZE"),
        ({"KALSHI_ETL_METRICS_PORT": "http"}, "KALSHI_ETL_METRICS_PORT: expected a TCP port"),
        ({"KALSHI_ETL_METRICS_PORT": "70000"}, "KALSHI_ETL_METRICS_PORT"),
        (
            {"KALSHI_READ_TOKENS_PER_SECOND": "fast"},
            "KALSHI_READ_TOKENS_PER_SECOND: expected a number",
        ),
        ({"KALSHI_READ_TOKENS_PER_SECOND": "-1"}, "KALSHI_READ_TOKENS_PER_SECOND"),
        ({"KALSHI_ETL_LOG_FORMAT": "xml"}, "KALSHI_ETL_LOG_FORMAT: expected text or json"),
        ({"DATABASE_URL": "mysql://u@h/d"}, "DATABASE_URL: expected a PostgreSQL URL"),
        ({"KALSHI_API_BASE": "api.kalshi.com"}, "KALSHI_API_BASE: expected an http(s) URL"),
    ],
)
def test_a_wrong_value_names_the_variable(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_env(env)


def test_a_bad_time_names_the_flag():
    with pytest.raises(ConfigError, match="--since: expected an ISO-8601 time"):
        parse_time("last tuesday", name="--since")


def test_dotenv_values_are_read_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        "# comment\n"
        "export KALSHI_API_KEY_ID=from-file\n"
        "KALSHI_PAGE_SIZE='500'\n"
        'KALSHI_PRIVATE_KEY="-----BEGIN PRIVATE KEY-----\n'
        "AAAA\n"
        '-----END PRIVATE KEY-----"\n'
        "KALSHI_ETL_LOOKBACK=10m  # inline comment\n"
    )
    monkeypatch.setenv("KALSHI_PAGE_SIZE", "300")
    settings = from_env(environment(cwd=tmp_path))
    assert settings.api_key_id == "from-file"
    assert settings.page_size == 300
    assert settings.lookback == timedelta(minutes=10)
    assert settings.private_key_pem is not None and "AAAA\n-----END" in settings.private_key_pem


def test_a_malformed_dotenv_line_is_named(tmp_path):
    (tmp_path / ".env").write_text("GOOD=1\nthis is not a setting\n")
    with pytest.raises(ConfigError, match="line 2: expected KEY=value"):
        read_dotenv(tmp_path / ".env")


def test_secrets_stay_out_of_the_settings_repr():
    settings = from_env(
        {"DATABASE_URL": "postgresql://u:hunter2@h/d", "KALSHI_PRIVATE_KEY": "-----BEGIN x"}
    )
    assert "hunter2" not in repr(settings) and "BEGIN" not in repr(settings)


def test_the_cli_finds_the_home_make_demo_left_in_the_working_directory(tmp_path):
    (tmp_path / ".kalshi-etl" / "pgdata").mkdir(parents=True)
    assert from_env({}, cwd=tmp_path).home == tmp_path / ".kalshi-etl"
    assert from_env({}, cwd=tmp_path / "elsewhere").home == Path("~/.kalshi-etl").expanduser()
    assert from_env({"KALSHI_ETL_HOME": "/x"}, cwd=tmp_path).home == Path("/x")


ACCOUNTS = """
[[account]]
name = "main"
key_id = "key-main"
private_key_path = "keys/main.pem"

[[account]]
name = "mm-desk"
key_id = "key-mm"
private_key = "-----BEGIN PRIVATE KEY-----\\nMIIB\\n-----END PRIVATE KEY-----"
api_base = "https://demo-api.kalshi.co/trade-api/v2/"
read_tokens_per_second = 400
"""


def test_an_accounts_file_names_each_account_with_its_own_key_api_and_budget(tmp_path):
    path = tmp_path / "accounts.toml"
    path.write_text(ACCOUNTS)
    settings = from_env(
        {"KALSHI_ETL_ACCOUNTS": str(path), "KALSHI_API_KEY_ID": "ignored-when-a-file-is-set"}
    )
    main, desk = settings.accounts()
    assert (main.name, main.key_id, main.private_key_path) == (
        "main",
        "key-main",
        tmp_path / "keys" / "main.pem",  # relative to the file
    )
    assert main.api_base == settings.api_base and main.read_tokens_per_second is None
    assert desk.private_key_pem is not None and desk.private_key_path is None
    assert desk.api_base == "https://demo-api.kalshi.co/trade-api/v2"
    assert desk.read_tokens_per_second == 400.0
    assert "BEGIN" not in repr(settings)


def test_without_a_file_the_one_account_of_the_environment_is_named_by_its_key_id():
    settings = from_env({"KALSHI_API_KEY_ID": "abc-123", "KALSHI_PRIVATE_KEY_PATH": "/k.pem"})
    [only] = settings.accounts()
    assert only.name == only.key_id == "abc-123"
    assert from_env({}).accounts() == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "is not valid TOML"),
        ("[something]\nx = 1\n", "has no [[account]] tables"),
        ('[[account]]\nname = "a"\nprivate_key_path = "k"\n', "#1: key_id is missing"),
        (
            '[[account]]\nname = "a"\nkey_id = "k"\n',
            "account 'a': set exactly one of private_key_path and private_key",
        ),
        (
            '[[account]]\nname = "a"\nkey_id = "k"\nprivate_key_path = "p"\nprivate_key = "x"\n',
            "set exactly one of",
        ),
        ('[[account]]\nname = "a"\nkey_id = "k"\nprivte_key_path = "p"\n', "unknown key"),
        ('[[account]]\nname = "a b"\nkey_id = "k"\nprivate_key_path = "p"\n', "without spaces"),
        (
            '[[account]]\nname = "a"\nkey_id = "k"\nprivate_key_path = "p"\napi_base = "x"\n',
            "account 'a': api_base: expected an http(s) URL",
        ),
        (
            '[[account]]\nname = "a"\nkey_id = "k"\nprivate_key_path = "p"\n'
            "read_tokens_per_second = -1\n",
            "read_tokens_per_second must be a number >= 0",
        ),
        (
            '[[account]]\nname = "a"\nkey_id = "k"\nprivate_key_path = "p"\n'
            '[[account]]\nname = "a"\nkey_id = "k2"\nprivate_key_path = "p"\n',
            "name 'a' appears more than once",
        ),
    ],
)
def test_a_wrong_accounts_file_is_named_with_the_entry_and_key(tmp_path, text, message):
    path = tmp_path / "accounts.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="KALSHI_ETL_ACCOUNTS") as caught:
        from_env({"KALSHI_ETL_ACCOUNTS": str(path)})
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_a_missing_accounts_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read .*nowhere.toml"):
        from_env({"KALSHI_ETL_ACCOUNTS": str(tmp_path / "nowhere.toml")})
