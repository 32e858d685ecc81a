"""Settings: the whole configuration, read once at the entry point.

:func:`from_env` builds a frozen :class:`Settings` from a mapping of environment variables (the
process environment over an optional ``.env`` file), validating every value eagerly. A wrong
value raises :class:`~etl.errors.ConfigError` naming the variable and what it expected. Lower
layers never read the environment; they get plain arguments from ``cli``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from etl.errors import ConfigError

PRODUCTION_API_BASE = "https://api.elections.kalshi.com/trade-api/v2"
DEMO_API_BASE = "https://demo-api.kalshi.co/trade-api/v2"

LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class Account:
    """One Kalshi account to sync: its name in the tables, its key, its API and read budget."""

    name: str
    key_id: str
    private_key_path: Path | None = None
    private_key_pem: str | None = field(default=None, repr=False)
    api_base: str = PRODUCTION_API_BASE
    # None: the key's own budget, asked of the API (GET /account/limits).
    read_tokens_per_second: float | None = None


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Secrets are kept out of ``repr``."""

    database_url: str | None = field(default=None, repr=False)
    home: Path = Path("~/.kalshi-etl").expanduser()
    api_base: str = PRODUCTION_API_BASE
    api_key_id: str | None = None
    private_key_path: Path | None = None
    private_key_pem: str | None = field(default=None, repr=False)
    read_tokens_per_second: float | None = None  # None: the key's budget (GET /account/limits)
    page_size: int | Literal["auto"] = "auto"
    lookback: timedelta = timedelta(minutes=5)
    log_format: LogFormat = "text"
    metrics_port: int | None = None
    realtime: bool = False
    accounts_file: Path | None = None
    file_accounts: tuple[Account, ...] = ()

    @property
    def has_credentials(self) -> bool:
        """True when a key id and a private key (path or text) are configured."""
        if self.accounts_file is not None:
            return bool(self.file_accounts)
        return bool(self.api_key_id) and bool(self.private_key_path or self.private_key_pem)

    def accounts(self) -> tuple[Account, ...]:
        """The accounts to sync: those of the accounts file, else the one of the environment
        (named by its key id), else none."""
        if self.accounts_file is not None:
            return self.file_accounts
        if not self.api_key_id:
            return ()
        return (
            Account(
                name=self.api_key_id,
                key_id=self.api_key_id,
                private_key_path=self.private_key_path,
                private_key_pem=self.private_key_pem,
                api_base=self.api_base,
                read_tokens_per_second=self.read_tokens_per_second,
            ),
        )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, *, name: str = "duration", positive: bool = False) -> timedelta:
    """Parse ``30s``, ``5m``, ``2h``, ``1d`` (or ``250ms``) into a timedelta.

    Raises:
        ConfigError: naming ``name`` when the text is not such a duration (or is zero when
            ``positive``).
    """
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{name}: expected a duration like 30s, 5m, 2h or 1d, got {text!r}")
    value = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    if positive and value <= timedelta(0):
        raise ConfigError(f"{name}: expected a duration above zero, like 30s, got {text!r}")
    return value


# Unix seconds past this (the year 5138) are surely milliseconds.
_MAX_SECONDS = 1e11


def parse_time(text: str, *, name: str = "time") -> datetime:
    """Parse ISO-8601 (``2025-01-31``, ``2025-01-31T12:00:00Z``) or Unix seconds; naive = UTC.

    Raises:
        ConfigError: naming ``name`` when the text is neither.
    """
    stripped = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", stripped):
        seconds = float(stripped)
        if seconds >= _MAX_SECONDS:
            raise ConfigError(
                f"{name}: {text!r} looks like milliseconds; give Unix seconds "
                f"({int(seconds // 1000)}) or an ISO-8601 time"
            )
        return datetime.fromtimestamp(seconds, tz=UTC)
    try:
        value = datetime.fromisoformat(stripped)
    except ValueError:
        raise ConfigError(
            f"{name}: expected an ISO-8601 time (2025-01-31 or 2025-01-31T12:00:00Z) "
            f"or Unix seconds, got {text!r}"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def normalise_database_url(url: str, *, name: str = "DATABASE_URL") -> str:
    """Map ``postgresql://``/``postgres://`` to the psycopg 3 driver; refuse other databases
    and URLs that cannot be parsed (a port that is not a number, say)."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            normalised = "postgresql+psycopg://" + url[len(prefix) :]
            netloc = urlsplit(normalised).netloc.rsplit("@", 1)[-1]
            port = netloc.rsplit(":", 1)[1] if ":" in netloc and not netloc.endswith("]") else ""
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(
                    f"{name}: the port {port!r} is not a port number; expected "
                    "postgresql://user:pass@host:5432/db"
                )
            return normalised
    scheme = url.split(":", 1)[0] if ":" in url else url[:20]
    raise ConfigError(
        f"{name}: expected a PostgreSQL URL like postgresql://user:pass@host:5432/db, "
        f"got scheme {scheme!r}"
    )


def read_dotenv(path: Path) -> dict[str, str]:
    """Read a ``.env`` file: ``KEY=value`` lines, ``#`` comments, optional ``export`` and quotes.

    A double-quoted value may span lines (a PEM key) and understands ``\\n``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    values: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ConfigError(f"{path}: line {i}: expected KEY=value, got {line[:40]!r}")
        value = value.strip()
        if value[:1] in ('"', "'"):
            quote = value[0]
            body = value[1:]
            while not body.rstrip().endswith(quote) and i < len(lines):
                body += "\n" + lines[i]
                i += 1
            body = body.rstrip()
            if not body.endswith(quote):
                raise ConfigError(f"{path}: unterminated {quote} quote for {key.strip()}")
            value = body[:-1]
            if quote == '"':
                value = value.replace("\\n", "\n")
        else:
            value = value.split(" #", 1)[0].strip()
        values[key.strip()] = value
    return values


def environment(*, cwd: Path | None = None) -> dict[str, str]:
    """The process environment over ``./.env`` (the environment wins)."""
    dotenv = (cwd or Path.cwd()) / ".env"
    merged = read_dotenv(dotenv) if dotenv.is_file() else {}
    merged.update(os.environ)
    return merged


def _api_base(value: str, name: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value) or not urlsplit(value).path.rstrip("/").endswith(
        "/trade-api/v2"
    ):
        raise ConfigError(
            f"{name}: expected an http(s) URL ending in /trade-api/v2 (like "
            f"{PRODUCTION_API_BASE}), got {value!r}"
        )
    return value.rstrip("/")


_ACCOUNT_KEYS = {
    "name",
    "key_id",
    "private_key_path",
    "private_key",
    "api_base",
    "read_tokens_per_second",
}
_NAME = re.compile(r"^[^\s\x00-\x1f]{1,100}$")


def read_accounts_file(
    path: Path, *, api_base: str, read_tokens_per_second: float | None
) -> tuple[Account, ...]:
    """The ``[[account]]`` entries of the TOML file at ``path``, validated.

    ``api_base`` and ``read_tokens_per_second`` are the defaults of entries that do not set
    them; a relative ``private_key_path`` is relative to the file's folder.

    Raises:
        ConfigError: naming the file, the entry and the key that is wrong.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"KALSHI_ETL_ACCOUNTS: cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"KALSHI_ETL_ACCOUNTS: {path} is not valid TOML: {exc}") from None
    entries = data.get("account")
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise ConfigError(
            f"KALSHI_ETL_ACCOUNTS: {path} has no [[account]] tables; each account needs "
            "name, key_id and private_key_path (or private_key)"
        )
    accounts: list[Account] = []
    for number, entry in enumerate(entries, 1):
        where = f"KALSHI_ETL_ACCOUNTS: {path}, [[account]] #{number}"
        unknown = sorted(set(entry) - _ACCOUNT_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_ACCOUNT_KEYS))})"
            )

        def text(key: str, entry: dict[str, object] = entry, where: str = where) -> str | None:
            value = entry.get(key)
            if value is None:
                return None
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: {key} must be a non-empty string")
            return value.strip()

        name, key_id = text("name"), text("key_id")
        if name is None or key_id is None:
            raise ConfigError(f"{where}: {'name' if name is None else 'key_id'} is missing")
        if not _NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} must be 1-100 characters without spaces")
        where = f"KALSHI_ETL_ACCOUNTS: {path}, account {name!r}"
        key_path, pem = text("private_key_path", where=where), text("private_key", where=where)
        if (key_path is None) == (pem is None):
            raise ConfigError(f"{where}: set exactly one of private_key_path and private_key")
        tokens = entry.get("read_tokens_per_second", read_tokens_per_second)
        if tokens is not None and (
            isinstance(tokens, bool) or not isinstance(tokens, int | float) or tokens < 0
        ):
            raise ConfigError(f"{where}: read_tokens_per_second must be a number >= 0")
        accounts.append(
            Account(
                name=name,
                key_id=key_id,
                private_key_path=(path.parent / Path(key_path).expanduser()) if key_path else None,
                private_key_pem=pem,
                api_base=_api_base(text("api_base", where=where) or api_base, f"{where}: api_base"),
                read_tokens_per_second=None if tokens is None else float(tokens),
            )
        )
    for attribute in ("name", "key_id"):
        values = [getattr(a, attribute) for a in accounts]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ConfigError(
                f"KALSHI_ETL_ACCOUNTS: {path}: {attribute} {twice[0]!r} appears more than once"
            )
    return tuple(accounts)


def _positive_float(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name}: expected a number >= 0 (0 turns the limit off), got {raw!r}")
    return value


def _page_size(env: Mapping[str, str]) -> int | Literal["auto"]:
    raw = env.get("KALSHI_PAGE_SIZE", "").strip().lower()
    if not raw or raw == "auto":
        return "auto"
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ConfigError(
            f"KALSHI_PAGE_SIZE: expected auto or an integer from 1 to 1000, got {raw!r}"
        )
    return int(raw)


def _port(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ConfigError(f"{name}: expected a TCP port from 0 to 65535, got {raw!r}")
    return int(raw)


def _switch(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}: expected 1/true/yes/on or 0/false/no/off, got {raw!r}")


HOME_DIR = ".kalshi-etl"


def default_home(cwd: Path | None) -> Path:
    """``./.kalshi-etl`` when the working directory holds one with an embedded database (what
    ``make demo`` leaves), so that the CLI and the demo agree; else ``~/.kalshi-etl``."""
    if cwd is not None and (cwd / HOME_DIR / "pgdata").is_dir():
        return cwd / HOME_DIR
    return Path("~", HOME_DIR).expanduser()


def from_env(env: Mapping[str, str], *, demo: bool = False, cwd: Path | None = None) -> Settings:
    """Build :class:`Settings` from environment variables (see CONTRACT.md for the list).

    Args:
        env: the variables, usually :func:`environment`.
        demo: target Kalshi's demo environment (``--demo``) instead of ``KALSHI_API_BASE``.
        cwd: where to look for a ``.kalshi-etl`` home when ``KALSHI_ETL_HOME`` is unset.

    Raises:
        ConfigError: naming the first variable whose value is wrong.
    """

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    database_url = get("DATABASE_URL")
    if database_url is not None:
        database_url = normalise_database_url(database_url)

    api_base = _api_base(
        DEMO_API_BASE if demo else (get("KALSHI_API_BASE") or PRODUCTION_API_BASE),
        "KALSHI_API_BASE",
    )
    read_tokens = _positive_float(env, "KALSHI_READ_TOKENS_PER_SECOND", None)
    accounts_file = Path(raw).expanduser() if (raw := get("KALSHI_ETL_ACCOUNTS")) else None
    file_accounts = (
        read_accounts_file(accounts_file, api_base=api_base, read_tokens_per_second=read_tokens)
        if accounts_file is not None
        else ()
    )

    log_format = (get("KALSHI_ETL_LOG_FORMAT") or "text").lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"KALSHI_ETL_LOG_FORMAT: expected text or json, got {log_format!r}")

    key_path = get("KALSHI_PRIVATE_KEY_PATH")
    pem = env.get("KALSHI_PRIVATE_KEY", "").strip() or None
    if pem is not None and "\\n" in pem and "\n" not in pem:
        pem = pem.replace("\\n", "\n")

    return Settings(
        database_url=database_url,
        home=Path(home).expanduser() if (home := get("KALSHI_ETL_HOME")) else default_home(cwd),
        api_base=api_base,
        api_key_id=get("KALSHI_API_KEY_ID"),
        private_key_path=Path(key_path).expanduser() if key_path else None,
        private_key_pem=pem,
        read_tokens_per_second=read_tokens,
        page_size=_page_size(env),
        lookback=parse_duration(get("KALSHI_ETL_LOOKBACK") or "5m", name="KALSHI_ETL_LOOKBACK"),
        log_format=log_format,  # type: ignore[arg-type]
        metrics_port=_port(env, "KALSHI_ETL_METRICS_PORT"),
        realtime=_switch(env, "KALSHI_ETL_REALTIME"),
        accounts_file=accounts_file,
        file_accounts=file_accounts,
    )
