"""The one exception tree of kalshi-etl.

Every error a user can meet is an :class:`EtlError`; the CLI prints its message on one line and
exits with its ``exit_code``. Third-party errors (httpx, psycopg, cryptography) are translated
into this tree at one boundary each and chained with ``from``. Bad *records* are not errors:
they are :class:`etl.kalshi.parse.Rejected` values.

::

    EtlError                      exit 1
    ├── ConfigError               exit 2  bad variable, flag, key file, missing credentials
    ├── DatabaseError             exit 2  unreachable or misconfigured database
    ├── LockBusyError             exit 1  another process syncs the same account and stream
    ├── LockLostError             exit 1  the lock's database session ended mid-run
    ├── StopRequested             exit 0  SIGINT/SIGTERM: the page in flight was committed
    └── ApiError                  exit 1
        ├── ApiStatusError                the API answered 4xx/5xx (after retries for 429/5xx)
        ├── ApiTransportError             network error or timeout (after retries)
        └── ApiProtocolError              a body the protocol forbids (not JSON, repeated cursor)
"""

from __future__ import annotations


class EtlError(Exception):
    """Root of every error kalshi-etl raises on purpose."""

    exit_code = 1


class ConfigError(EtlError):
    """A configuration value is missing or wrong; the message names it and what was expected."""

    exit_code = 2


class DatabaseError(EtlError):
    """The database cannot be reached or used; the message masks any password."""

    exit_code = 2


class DatabaseUnavailable(DatabaseError):
    """The database did not answer a connection attempt (down, starting, unreachable, or
    refusing the login): other commands exit 2 on it; the daemon waits and tries again."""


class LockBusyError(EtlError):
    """Another process holds the sync lock of this account and stream."""


class LockLostError(EtlError):
    """The advisory lock of a running sync vanished (its session ended); the run stops before
    writing more, so that two writers never overlap."""


class StopRequested(EtlError):
    """A stop was asked for; the run ended after committing the page in flight."""

    exit_code = 0


class ApiError(EtlError):
    """The Kalshi API (or the network in front of it) failed a request."""


class ApiStatusError(ApiError):
    """The API answered with an error status.

    Attributes:
        status: the HTTP status code.
        code: the API's error code, when its body had one.
        api_message: the API's error message, when its body had one.
    """

    def __init__(
        self, *, method: str, path: str, status: int, code: str | None, api_message: str | None
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.code = code
        self.api_message = api_message
        detail = ": ".join(part for part in (code, api_message) if part)
        super().__init__(
            f"Kalshi API {method} {path} answered {status}" + (f" ({detail})" if detail else "")
        )


class ApiTransportError(ApiError):
    """The request never got an answer: connection refused, DNS, TLS or timeout."""


class ApiProtocolError(ApiError):
    """The API answered something the protocol does not allow.

    Attributes:
        body: the raw body text, when the fault was a body that is not JSON, so that it can be
            kept in ``rejected_records``.
    """

    def __init__(self, message: str, *, body: str | None = None) -> None:
        self.body = body
        super().__init__(message)
