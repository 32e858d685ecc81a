"""Signing: the message rule of KALSHI.md, signatures the simulator's verifier accepts over
real HTTP, and the classic mistakes (query string signed, prefix left out) rejected."""

from __future__ import annotations

import logging
from collections.abc import Generator

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from etl.errors import ApiStatusError, ConfigError
from etl.kalshi.auth import (
    KalshiAuth,
    load_private_key,
    read_private_key_file,
    sign,
    signing_message,
    verify,
)
from etl.kalshi.client import KalshiClient
from etl.simulator.keys import key_id, private_pem


def test_the_message_is_timestamp_method_and_path_without_query():
    message = signing_message(1703123456789, "get", "/trade-api/v2/portfolio/orders?limit=5")
    assert message == b"1703123456789GET/trade-api/v2/portfolio/orders"


def test_a_signature_verifies_with_the_public_key_and_not_for_another_message(private_key):
    message = signing_message(1703123456789, "GET", "/trade-api/v2/portfolio/orders")
    signature = sign(private_key, message)
    assert verify(private_key.public_key(), message, signature)
    assert not verify(private_key.public_key(), message + b"x", signature)
    assert not verify(private_key.public_key(), message, "not base64!")


def test_auth_signs_the_full_path_with_a_fresh_millisecond_timestamp(private_key):
    auth = KalshiAuth("key-1", private_key, clock=lambda: 1703123456.789)
    request = httpx.Request("GET", "https://h/trade-api/v2/portfolio/orders?limit=5&cursor=x")
    signed = next(auth.auth_flow(request))
    assert signed.headers["KALSHI-ACCESS-KEY"] == "key-1"
    assert signed.headers["KALSHI-ACCESS-TIMESTAMP"] == "1703123456789"
    expected = signing_message(1703123456789, "GET", "/trade-api/v2/portfolio/orders")
    assert verify(private_key.public_key(), expected, signed.headers["KALSHI-ACCESS-SIGNATURE"])


class _SignsWrongPath(KalshiAuth):
    """Signs what careless clients sign; the headers otherwise look right."""

    def __init__(self, key_id: str, key: rsa.RSAPrivateKey, mistake: str) -> None:
        super().__init__(key_id, key)
        self.mistake = mistake
        self.key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        signed = next(super().auth_flow(request))
        ts = int(signed.headers["KALSHI-ACCESS-TIMESTAMP"])
        path = request.url.raw_path.decode()
        if self.mistake == "query":
            message = f"{ts}GET{path}".encode()  # query string included
        else:
            message = f"{ts}GET{path.split('?')[0].removeprefix('/trade-api/v2')}".encode()
        signed.headers["KALSHI-ACCESS-SIGNATURE"] = sign(self.key, message)
        yield signed


def test_the_simulator_accepts_a_correct_signature_over_real_http(live_simulator, private_key):
    with KalshiClient(
        live_simulator.base_url,
        auth=KalshiAuth(key_id(private_key), private_key),
        tokens_per_second=0,
    ) as client:
        page = next(client.iter_order_pages(status="resting"))
    assert page.items and all(o["status"] == "resting" for o in page.items)


@pytest.mark.parametrize("mistake", ["query", "no-prefix"])
def test_the_simulator_rejects_a_signature_over_the_wrong_path(
    live_simulator, private_key, mistake
):
    auth = _SignsWrongPath(key_id(private_key), private_key, mistake)
    with KalshiClient(live_simulator.base_url, auth=auth, tokens_per_second=0) as client:
        with pytest.raises(ApiStatusError) as caught:
            next(client.iter_order_pages())
    assert caught.value.status == 401
    assert caught.value.api_message == "invalid signature"


def test_the_simulator_rejects_a_stale_timestamp(app, private_key):
    import time

    auth = KalshiAuth(key_id(private_key), private_key, clock=lambda: time.time() - 61)
    transport = httpx.WSGITransport(app=app)
    with KalshiClient("http://s/trade-api/v2", auth=auth, transport=transport) as client:
        with pytest.raises(ApiStatusError, match="more than 60 s off"):
            client.get_order("x")


def test_the_simulator_rejects_an_unsigned_request(app):
    with KalshiClient(
        "http://s/trade-api/v2", auth=None, transport=httpx.WSGITransport(app=app)
    ) as c:
        with pytest.raises(ApiStatusError, match="missing authentication headers"):
            c.get_order("x")


def test_a_missing_key_file_is_a_config_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"KALSHI_PRIVATE_KEY_PATH=.*nope\.pem: no such file"):
        read_private_key_file(tmp_path / "nope.pem")


def test_a_file_that_is_not_a_key_is_a_config_error(tmp_path):
    path = tmp_path / "key.pem"
    path.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        read_private_key_file(path)


def test_an_encrypted_key_is_a_config_error(private_key):
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ConfigError, match="encrypted"):
        load_private_key(pem, source="KALSHI_PRIVATE_KEY")


def test_a_key_that_is_not_rsa_is_a_config_error():
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError, match="needs an RSA private key"):
        load_private_key(pem, source="KALSHI_PRIVATE_KEY")


def test_a_key_file_readable_by_others_draws_a_warning(private_key, tmp_path, caplog):
    path = tmp_path / "key.pem"
    path.write_bytes(private_pem(private_key))
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        read_private_key_file(path)
    assert "readable by group or others" in caplog.text


def test_the_key_never_shows_in_repr_or_errors(private_key):
    auth = KalshiAuth("key-1", private_key)
    assert "PRIVATE" not in repr(auth) and "RSA" not in repr(auth)
    try:
        load_private_key(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", source="X"
        )
    except ConfigError as exc:
        assert "AAAA" not in str(exc)
