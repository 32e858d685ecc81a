"""Request signing for the Kalshi Trade API v2, as an :class:`httpx.Auth` flow.

The message is ``str(timestamp_ms) + METHOD + path``, where ``path`` is the URL path including
``/trade-api/v2`` and excluding host and query string; it is signed with RSA-PSS, SHA-256,
MGF1(SHA-256) and a salt as long as the digest, then base64-encoded. :func:`signing_message`
is pure so that the simulator verifies with the very same rule. The private key is loaded
once; neither it nor any signature or header value reaches a log record or an error message.
"""

from __future__ import annotations

import base64
import logging
import stat
import time
from collections.abc import Callable, Generator
from pathlib import Path

import httpx
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from etl.errors import ConfigError

log = logging.getLogger(__name__)

KEY_HEADER = "KALSHI-ACCESS-KEY"
TIMESTAMP_HEADER = "KALSHI-ACCESS-TIMESTAMP"
SIGNATURE_HEADER = "KALSHI-ACCESS-SIGNATURE"

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=hashes.SHA256.digest_size)


def signing_message(timestamp_ms: int, method: str, path: str) -> bytes:
    """The bytes to sign: timestamp, upper-case method and path without its query string."""
    return f"{timestamp_ms}{method.upper()}{path.split('?', 1)[0]}".encode()


def sign(private_key: rsa.RSAPrivateKey, message: bytes) -> str:
    """RSA-PSS/SHA-256 signature of ``message``, standard base64."""
    return base64.b64encode(private_key.sign(message, _PSS, hashes.SHA256())).decode("ascii")


def verify(public_key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    """True when ``signature_b64`` is a valid signature of ``message`` by ``public_key``."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public_key.verify(signature, message, _PSS, hashes.SHA256())
    except (InvalidSignature, ValueError):
        return False
    return True


def load_private_key(pem: bytes, *, source: str) -> rsa.RSAPrivateKey:
    """Load an unencrypted RSA private key from PEM bytes.

    Args:
        pem: the PEM text.
        source: where it came from (a file path or variable name), for the error message.

    Raises:
        ConfigError: when the text is not a PEM key, is encrypted, or is not RSA.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(
            f"{source}: the private key is encrypted; export it without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{source}: not a PEM private key (expected '-----BEGIN ... PRIVATE KEY-----')"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{source}: Kalshi needs an RSA private key, this is another kind")
    return key


def read_private_key_file(path: Path) -> rsa.RSAPrivateKey:
    """Load the key at ``path``; warn when group or others can read it.

    Raises:
        ConfigError: naming ``KALSHI_PRIVATE_KEY_PATH`` and the file when it cannot be used.
    """
    source = f"KALSHI_PRIVATE_KEY_PATH={path}"
    try:
        mode = path.stat().st_mode
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, expected a PEM file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the file ({exc.strerror})") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("private key file %s is readable by group or others; chmod 600 it", path)
    return load_private_key(pem, source=source)


_warned: set[Path] = set()


def warn_if_exposed(path: Path, *, what: str) -> None:
    """Warn (once per file and process) when ``path``, which ``what`` (e.g. "holds a private
    key"), can be read by group or others: an accounts file or a ``.env`` with the PEM text
    inline is as much a key file as a PEM file."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH) and path not in _warned:
        _warned.add(path)
        log.warning("%s %s and is readable by group or others; chmod 600 it", path, what)


class KalshiAuth(httpx.Auth):
    """Signs each request at send time, so that every retry carries a fresh timestamp.

    Args:
        key_id: the API key id, sent as ``KALSHI-ACCESS-KEY``.
        private_key: the RSA key that signs.
        clock: seconds since the epoch; injectable for known-answer tests.
    """

    def __init__(
        self,
        key_id: str,
        private_key: rsa.RSAPrivateKey,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key_id = key_id
        self._private_key = private_key
        self._clock = clock

    def __repr__(self) -> str:
        return f"KalshiAuth(key_id={self.key_id!r})"

    def headers(self, method: str, path: str) -> dict[str, str]:
        """The three signed headers for ``method`` on ``path`` (no query string), timestamped
        now: the REST client's requests and the WebSocket's upgrade both carry them."""
        timestamp_ms = int(self._clock() * 1000)
        return {
            KEY_HEADER: self.key_id,
            TIMESTAMP_HEADER: str(timestamp_ms),
            SIGNATURE_HEADER: sign(
                self._private_key, signing_message(timestamp_ms, method.upper(), path)
            ),
        }

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        path = request.url.raw_path.decode("ascii").split("?", 1)[0]
        request.headers.update(self.headers(request.method, path))
        yield request
