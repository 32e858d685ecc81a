"""The simulator's 2026 answers are valid for the official Kalshi SDK (kalshi-python-sync 3.34,
installed by the Makefile): every endpoint kalshi-etl reads, parsed by the SDK's own models."""

from __future__ import annotations

from typing import Any

import kalshi_python_sync.models as models  # installed by the Makefile
import pytest

from etl.simulator import Exchange, SimulatorApp
from etl.simulator.keys import key_id
from tests.fix_exchange import NOW, make_client


@pytest.fixture
def sdk_client(private_key):
    # Every kind of order: resting, partly filled, executed, canceled, historical, zero fees.
    exchange = Exchange(seed=11, orders=400, api="2026", now=NOW, events_per_second=0)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    return exchange, make_client(app, private_key, page_size=200)


def test_order_pages_and_historical_pages_are_valid_sdk_responses(sdk_client):
    exchange, client = sdk_client
    bodies: list[dict[str, Any]] = []
    for path in ("portfolio/orders", "historical/orders"):
        cursor = None
        while True:
            params = {"limit": 200, **({"cursor": cursor} if cursor else {})}
            body = client._get_json(path, params=params)  # noqa: SLF001 - the raw answer
            bodies.append(body)
            cursor = body["cursor"]
            if not cursor:
                break
    orders = [models.GetOrdersResponse.from_dict(body).orders for body in bodies]
    assert sum(len(page) for page in orders) == len(exchange.truth())
    assert {o.status for page in orders for o in page} >= {"resting", "executed", "canceled"}


def test_an_order_by_id_is_a_valid_sdk_response(sdk_client):
    exchange, client = sdk_client
    for order_id in exchange.resting_ids()[:20]:
        body = client._get_json(f"portfolio/orders/{order_id}")  # noqa: SLF001
        assert models.GetOrderResponse.from_dict(body).order.order_id == order_id


def test_queue_positions_cutoff_and_user_data_timestamp_are_valid_sdk_responses(sdk_client):
    exchange, client = sdk_client
    body = client._get_json(  # noqa: SLF001
        "portfolio/orders/queue_positions", params={"market_tickers": ",".join(exchange.tickers)}
    )
    assert models.GetOrderQueuePositionsResponse.from_dict(body).queue_positions
    empty = client._get_json(  # noqa: SLF001
        "portfolio/orders/queue_positions", params={"market_tickers": "NO-SUCH-MARKET"}
    )
    assert models.GetOrderQueuePositionsResponse.from_dict(empty).queue_positions == []
    cutoff = client._get_json("historical/cutoff")  # noqa: SLF001
    assert models.GetHistoricalCutoffResponse.from_dict(cutoff).orders_updated_ts is not None
    stamp = client._get_json("exchange/user_data_timestamp")  # noqa: SLF001
    assert models.GetUserDataTimestampResponse.from_dict(stamp).as_of_time is not None


def _pages(client, path: str, **params: Any) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 200, **params, **({"cursor": cursor} if cursor else {})}
        body = client._get_json(path, params=query)  # noqa: SLF001 - the raw answer
        bodies.append(body)
        cursor = body["cursor"]
        if not cursor:
            return bodies


def test_fill_pages_of_both_tiers_are_valid_sdk_responses(sdk_client):
    exchange, client = sdk_client
    fills = [
        fill
        for path in ("portfolio/fills", "historical/fills")
        for body in _pages(client, path)
        for fill in models.GetFillsResponse.from_dict(body).fills
    ]
    assert len(fills) == sum(1 for _ in exchange.ledger.fills()) > 0
    assert {f.subaccount_number or 0 for f in fills} == {0, 1}


def test_settlement_pages_and_subaccount_balances_are_valid_sdk_responses(sdk_client):
    exchange, client = sdk_client
    yes, no, scalar = exchange.tickers[:3]
    exchange.settle_market(yes, "yes")
    exchange.settle_market(no, "no")
    exchange.settle_market(scalar, "scalar", 50)
    rows = [
        row
        for body in _pages(client, "portfolio/settlements")
        for row in models.GetSettlementsResponse.from_dict(body).settlements
    ]
    assert {r.market_result for r in rows} == {"yes", "no", "scalar"}
    assert len(rows) == len(exchange.ledger.settlements())
    balances = client._get_json("portfolio/subaccounts/balances")  # noqa: SLF001
    parsed = models.GetSubaccountBalancesResponse.from_dict(balances).subaccount_balances
    assert {b.subaccount_number for b in parsed} == {0, 1}


def test_positions_balances_and_cash_movements_are_valid_sdk_responses(sdk_client):
    exchange, client = sdk_client
    exchange.settle_market(exchange.tickers[0], "scalar", 50)
    exchange.archive_event(exchange.tickers[1].rsplit("-", 1)[0])
    positions = [
        position
        for path in ("portfolio/positions", "historical/positions")
        for subaccount in (0, 1)
        for body in _pages(client, path, subaccount=subaccount, settlement_status="all")
        for position in models.GetPositionsResponse.from_dict(body).market_positions
    ]
    assert len(positions) == len(exchange.money.books().positions) > 0
    for subaccount in (0, 1):
        body = client._get_json("portfolio/balance", params={"subaccount": subaccount})  # noqa: SLF001
        assert models.GetBalanceResponse.from_dict(body).balance_dollars
    deposits = [
        d
        for body in _pages(client, "portfolio/deposits")
        for d in models.GetDepositsResponse.from_dict(body).deposits
    ]
    withdrawals = [
        w
        for body in _pages(client, "portfolio/withdrawals")
        for w in models.GetWithdrawalsResponse.from_dict(body).withdrawals
    ]
    transfers = [
        t
        for body in _pages(client, "portfolio/subaccounts/transfers")
        for t in models.GetSubaccountTransfersResponse.from_dict(body).transfers
    ]
    assert len(deposits) + len(withdrawals) + len(transfers) == len(exchange.money.cash)
    assert {d.status for d in deposits} == {"applied", "pending"}


def test_account_limits_and_endpoint_costs_are_valid_sdk_responses(sdk_client):
    _, client = sdk_client
    limits = models.GetAccountApiLimitsResponse.from_dict(
        client._get_json("account/limits")  # noqa: SLF001
    )
    assert limits.read.refill_rate > 0 and limits.read.bucket_capacity >= limits.read.refill_rate
    costs = models.GetAccountEndpointCostsResponse.from_dict(
        client._get_json("account/endpoint_costs")  # noqa: SLF001
    )
    assert costs.default_cost == 10
