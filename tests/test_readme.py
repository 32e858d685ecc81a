"""The README's and the docs' SQL runs: every statement of their ```sql blocks, on a synced
database."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from etl.streams.registry import LISTINGS
from etl.sync.listing import sync_listing
from etl.sync.orders import sync_orders
from etl.sync.queue import poll_queue_positions
from tests.sync.helpers import ACCOUNT

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def readme_statements() -> list[str]:
    text = "\n".join(page.read_text() for page in PAGES)
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    statements = [s.strip() for block in blocks for s in block.split(";")]
    return [
        s for s in statements if s and not all(line.startswith("--") for line in s.splitlines())
    ]


def test_the_readmes_queries_run_and_answer(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    poll_queue_positions(db, client, account=ACCOUNT)
    exchange.settle_market(exchange.tickers[0], "yes")
    for stream in LISTINGS.values():
        sync_listing(db, client, stream, account=ACCOUNT)
    order_id = exchange.resting_ids()[0]
    market = next(p for p in exchange.money.positions(archived=False) if p.position).ticker
    statements = readme_statements()
    assert len(statements) >= 7
    with db.connect() as conn:
        for statement in statements:
            filled = (
                statement.replace("<order id>", order_id)
                .replace("<market>", market)
                .replace("<t>", datetime.now(UTC).isoformat())
            )
            rows = conn.execute(sa.text(filled)).all()
            assert rows or "rejected_records" in statement, statement  # nothing rejected here
