"""Several accounts in one database: each sync, settle and poll keeps to its own orders."""

from __future__ import annotations

import pytest

from etl.sync.orders import sync_orders
from etl.sync.queue import poll_queue_positions
from tests.fix_exchange import NOW, accounts_app, make_client, sim_accounts
from tests.sync.helpers import assert_table_equals_truth, count, queue_truth


@pytest.fixture
def two(account_keys):
    accounts = sim_accounts(account_keys, 2, orders=200, now=NOW, events_per_second=0)
    return accounts, accounts_app(accounts, advance=False)


def _by_id_lookups(app) -> list[str]:
    return [
        path
        for path, _ in app.requests
        if path.startswith("/trade-api/v2/portfolio/orders/") and "queue_position" not in path
    ]


def test_two_accounts_share_a_database_without_touching_each_others_orders(db, two):
    accounts, app = two
    alpha, beta = accounts
    with make_client(app, alpha.key) as ca, make_client(app, beta.key) as cb:
        for account, client in ((alpha, ca), (beta, cb)):
            sync_orders(db, client, account=account.name)
            poll_queue_positions(db, client, account=account.name)
        app.requests.clear()
        # A cycle with nothing new: before accounts were in the schema, alpha's settle looked
        # up each of beta's open orders by id (with alpha's key) and polled beta's markets.
        sync_orders(db, ca, account=alpha.name)
        result = poll_queue_positions(db, ca, account=alpha.name)
    assert _by_id_lookups(app) == []
    assert result.counts.inserted == 0
    for account in accounts:
        assert_table_equals_truth(db, account.exchange, account.name)
        with db.connect() as conn:
            snapshots = conn.exec_driver_sql(
                "SELECT DISTINCT order_id FROM queue_position_snapshots WHERE account = %s",
                (account.name,),
            ).scalars()
            assert set(snapshots) == set(queue_truth(account.exchange))
    assert count(db, "SELECT count(DISTINCT account) FROM orders") == 2


def test_a_fill_in_one_account_is_settled_by_that_accounts_cycle_only(db, two):
    accounts, app = two
    alpha, beta = accounts
    with make_client(app, alpha.key) as ca, make_client(app, beta.key) as cb:
        for account, client in ((alpha, ca), (beta, cb)):
            sync_orders(db, client, account=account.name)
        resting = alpha.exchange.resting_ids()[0]
        alpha.exchange.fill(resting, alpha.exchange.order(resting).initial)
        beta_result = sync_orders(db, cb, account=beta.name)
        assert beta_result.counts.updated == 0  # beta's cycle does not see alpha's order
        sync_orders(db, ca, account=alpha.name)
    assert_table_equals_truth(db, alpha.exchange, alpha.name)
    assert_table_equals_truth(db, beta.exchange, beta.name)


def test_each_key_reads_its_own_account_on_the_simulator(two):
    accounts, app = two
    listed = []
    for account in accounts:
        with make_client(app, account.key) as client:
            ids = {item["order_id"] for page in client.iter_order_pages() for item in page.items}
        assert ids and ids <= set(account.exchange.truth())
        listed.append(ids)
    assert not listed[0] & listed[1]
