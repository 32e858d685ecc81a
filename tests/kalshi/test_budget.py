"""The read budget is the key's own: asked of the API (GET /account/limits, the costs of
GET /account/endpoint_costs) unless configured, the Basic tier's where the API does not say."""

from __future__ import annotations

import logging

import httpx
import pytest

from etl.config import from_env
from etl.errors import ApiTransportError
from etl.kalshi.auth import KalshiAuth
from etl.kalshi.budget import (
    BASIC_TOKENS_PER_SECOND,
    EndpointCosts,
    read_endpoint_costs,
    read_limits,
)
from etl.kalshi.client import KalshiClient, RetryPolicy
from etl.simulator import SimulatorApp
from etl.simulator.keys import key_id
from tests.fix_exchange import BASE


def _client(app: SimulatorApp, private_key, tokens_per_second: float | None) -> KalshiClient:
    return KalshiClient(
        BASE,
        auth=KalshiAuth(key_id(private_key), private_key),
        transport=httpx.WSGITransport(app=app),
        tokens_per_second=tokens_per_second,
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, max_total=1),
    )


def _app(exchange, private_key, *, rate: float, serve_limits: bool = True) -> SimulatorApp:
    return SimulatorApp(
        exchange,
        {key_id(private_key): private_key.public_key()},
        advance=False,
        tokens_per_second=rate,
        serve_limits=serve_limits,
    )


def _paths(app: SimulatorApp) -> list[str]:
    return [path.removeprefix("/trade-api/v2") for path, _ in app.requests]


def test_an_unset_budget_is_read_from_account_limits_before_the_first_call(
    exchange, private_key, caplog
):
    app = _app(exchange, private_key, rate=1000)
    with caplog.at_level(logging.INFO), _client(app, private_key, None) as client:
        assert client.bucket.rate == BASIC_TOKENS_PER_SECOND  # nothing asked yet
        client.user_data_timestamp()
        assert client.limits is not None and client.limits.usage_tier == "premier"
        assert client.bucket.rate == 1000
        assert client.bucket.capacity == 1000  # one second of it: never more than the server's
        # The costs the server listed: a single order 2, everything else its default 10.
        assert client.costs.of("GET", "/portfolio/orders/{order_id}", 99) == 2
        assert client.costs.of("GET", "/portfolio/balance", 2) == 10
    assert _paths(app)[:3] == [
        "/account/limits",
        "/account/endpoint_costs",
        "/exchange/user_data_timestamp",
    ]
    assert "read budget: 1000 tokens/s (premier tier, bucket of 2000)" in caplog.text


def test_a_configured_budget_is_used_as_is_and_the_api_is_not_asked(exchange, private_key):
    app = _app(exchange, private_key, rate=1000)
    with _client(app, private_key, 350) as client:
        client.user_data_timestamp()
        assert client.bucket.rate == 350
    assert "/account/limits" not in _paths(app)


@pytest.mark.parametrize("failure", ["not served", "malformed"])
def test_without_an_answer_the_basic_budget_is_used_and_said_in_one_line(
    exchange, private_key, caplog, failure
):
    if failure == "not served":
        app = _app(exchange, private_key, rate=0, serve_limits=False)
        transport: httpx.BaseTransport = httpx.WSGITransport(app=app)
    else:
        app = _app(exchange, private_key, rate=0)
        inner = httpx.WSGITransport(app=app)

        def handle(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/account/limits"):
                return httpx.Response(200, json={"usage_tier": "basic", "read": {}})
            answer = inner.handle_request(request)
            answer.read()
            return httpx.Response(answer.status_code, content=answer.content)

        transport = httpx.MockTransport(handle)
    client = KalshiClient(
        BASE,
        auth=KalshiAuth(key_id(private_key), private_key),
        transport=transport,
        tokens_per_second=None,
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, max_total=1),
    )
    with caplog.at_level(logging.INFO), client:
        client.user_data_timestamp()
        client.user_data_timestamp()
        assert client.bucket.rate == BASIC_TOKENS_PER_SECOND
        assert client.costs == EndpointCosts()  # KALSHI.md's costs
    said = [r for r in caplog.records if "read budget" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "using the Basic tier's 200 tokens/s" in said[0].getMessage()


def test_the_environment_overrides_the_keys_budget_and_leaves_it_unset_otherwise(tmp_path):
    assert from_env({}, cwd=tmp_path).read_tokens_per_second is None
    overridden = from_env({"KALSHI_READ_TOKENS_PER_SECOND": "1000"}, cwd=tmp_path)
    assert overridden.read_tokens_per_second == 1000


def test_limits_and_costs_are_read_from_the_sdks_shapes():
    limits = read_limits(
        {
            "usage_tier": "premier",
            "read": {"refill_rate": 1000, "bucket_capacity": 1000},
            "write": {"refill_rate": 1000, "bucket_capacity": 2000},
            "grants": [],
        }
    )
    assert (limits.refill_rate, limits.bucket_capacity) == (1000, 1000)
    with pytest.raises(ValueError, match="refill_rate"):
        read_limits({"read": {"refill_rate": "lots"}})
    costs = read_endpoint_costs(
        {
            "default_cost": 10,
            "endpoint_costs": [
                {"method": "GET", "path": "/portfolio/orders/{order_id}", "cost": 2},
                {"method": "get", "path": "/trade-api/v2/portfolio/fills/", "cost": 20},
                {"method": "GET", "path": "/portfolio/positions", "cost": -1},  # skipped
            ],
        }
    )
    assert costs.of("GET", "/portfolio/orders/{id}", 10) == 2
    assert costs.of("GET", "/portfolio/fills", 10) == 20
    assert costs.of("GET", "/portfolio/positions", 2) == 10


def test_an_api_out_of_reach_says_nothing_of_the_budget_and_it_is_asked_again_later(
    exchange, private_key, caplog
):
    app = _app(exchange, private_key, rate=1000)
    inner = httpx.WSGITransport(app=app)
    down = [True]

    def flaky(request: httpx.Request) -> httpx.Response:
        if down[0]:
            raise httpx.ConnectError("connection refused", request=request)
        answer = inner.handle_request(request)
        answer.read()
        return httpx.Response(answer.status_code, content=answer.content)

    client = KalshiClient(
        BASE,
        auth=KalshiAuth(key_id(private_key), private_key),
        transport=httpx.MockTransport(flaky),
        tokens_per_second=None,
        retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, max_total=1),
    )
    with caplog.at_level(logging.INFO), client:
        with pytest.raises(ApiTransportError):
            client.user_data_timestamp()
        # The unreachable API is the call's own error; nothing is said about the budget.
        assert "read budget" not in caplog.text
        assert client.bucket.rate == BASIC_TOKENS_PER_SECOND
        down[0] = False
        client.user_data_timestamp()
        assert client.bucket.rate == 1000  # asked again once the API answers
