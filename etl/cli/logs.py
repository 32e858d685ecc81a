"""Logging for the command line: text or JSON lines on stderr, with every secret redacted.

Libraries only log (``getLogger(__name__)``); handlers are set here, once, by ``main``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_PEM = re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.S)
# A signed request's headers replay as the key until their timestamp expires: the signature's
# value goes, however a library prints a header (`name: value`, `'name': 'value'`, `(name,
# value)`), and so does a password in a URL.
_SIGNATURE = re.compile(
    r"""(kalshi-access-signature['"]?\s*[:=,]?\s*b?['"]?)[A-Za-z0-9+/=_-]+""", re.I
)
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@\s/]+@")


def _redact(message: str) -> str:
    """Last line of defence: no key material, signature or password reaches a log line."""
    if "-----BEGIN" in message:
        message = _PEM.sub("[redacted key]", message)
    if "ignature" in message or "IGNATURE" in message:
        message = _SIGNATURE.sub(r"\1[redacted]", message)
    if "://" in message and "@" in message:
        message = _URL_PASSWORD.sub(r"\1***@", message)
    return message


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record))


# What every LogRecord has; anything else on a record came as `extra=` and is a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the structured fields a
    call passed as ``extra`` (``stream``, ``account``, ``run_id``, counts, ``duration_ms``,
    ``error``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_") or key in entry:
                continue
            if isinstance(value, str):
                value = _redact(value)
            elif not isinstance(value, int | float | bool | type(None)):
                value = _redact(str(value))
            entry[key] = value
        if record.exc_info:
            entry["exception"] = _redact(self.formatException(record.exc_info))
        return json.dumps(entry)


def setup_logging(fmt: str, *, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "httpcore", "alembic", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # "skipped: maximum number of running instances reached" each interval of a long run is
    # noise: a late run is coalesced by design.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if debug else logging.ERROR)
