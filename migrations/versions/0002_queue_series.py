"""The complete queue-position series: closing rows, the two views, indexes for prune.

- ``queue_position_snapshots.queue_position`` becomes nullable: NULL is the closing row a poll
  writes when an order stops being open.
- ``queue_positions_current``: each open order with its latest stored position.
- ``queue_position_intervals``: each snapshot row with ``valid_from``/``valid_to``.
- ``ix_queue_position_snapshots_captured_at_order_id`` lets prune walk old rows in batches;
  ``ix_orders_synced_at`` lets a poll find the orders that closed since the last one.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 09:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CURRENT = """
CREATE VIEW queue_positions_current AS
SELECT o.order_id, o.ticker, o.subaccount_number, o.outcome_side, o.book_side,
       o.yes_price_dollars, o.remaining_count_fp, latest.queue_position, latest.captured_at
FROM orders o
LEFT JOIN LATERAL (
    SELECT s.queue_position, s.captured_at
    FROM queue_position_snapshots s
    WHERE s.order_id = o.order_id
    ORDER BY s.captured_at DESC
    LIMIT 1
) AS latest ON true
WHERE o.status IN ('resting', 'pending')
"""

INTERVALS = """
CREATE VIEW queue_position_intervals AS
SELECT s.order_id, s.market_ticker, s.queue_position, s.captured_at,
       s.captured_at AS valid_from,
       lead(s.captured_at) OVER (PARTITION BY s.order_id ORDER BY s.captured_at) AS valid_to
FROM queue_position_snapshots s
"""


def upgrade() -> None:
    op.alter_column(
        "queue_position_snapshots",
        "queue_position",
        existing_type=sa.Numeric(precision=18, scale=2),
        nullable=True,
    )
    op.create_index(
        op.f("ix_queue_position_snapshots_captured_at_order_id"),
        "queue_position_snapshots",
        ["captured_at", "order_id"],
        unique=False,
    )
    op.create_index(op.f("ix_orders_synced_at"), "orders", ["synced_at"], unique=False)
    op.execute(CURRENT)
    op.execute(INTERVALS)


def downgrade() -> None:
    op.execute("DROP VIEW queue_position_intervals")
    op.execute("DROP VIEW queue_positions_current")
    op.drop_index(op.f("ix_orders_synced_at"), table_name="orders")
    op.drop_index(
        op.f("ix_queue_position_snapshots_captured_at_order_id"),
        table_name="queue_position_snapshots",
    )
    # Closing rows have no position to restore: they go, as they did not exist before.
    op.execute("DELETE FROM queue_position_snapshots WHERE queue_position IS NULL")
    op.alter_column(
        "queue_position_snapshots",
        "queue_position",
        existing_type=sa.Numeric(precision=18, scale=2),
        nullable=False,
    )
