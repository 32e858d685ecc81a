"""Accounts in the data: ``orders.account`` and ``queue_position_snapshots.account``.

Several Kalshi accounts can now share one database, so every order and snapshot says whose it
is (the account name from the accounts file; the API key id without one).

Existing rows belong to the one account ``sync_state`` knows. When it knows none or several
(and there are rows to assign), the upgrade stops and says so: set
``KALSHI_ETL_MIGRATION_ACCOUNT`` to the account the existing rows belong to and run it again.
The columns are added with that account as their default, which PostgreSQL records without
rewriting the table, then the default is dropped: a large table upgrades in milliseconds.

``ix_orders_open`` (open orders of all accounts) gives way to ``ix_orders_account_status``.
The views gain an ``account`` column (last, so that positional readers keep working).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 12:00:00+00:00
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from etl.errors import ConfigError

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OVERRIDE = "KALSHI_ETL_MIGRATION_ACCOUNT"


def _views(*, account: bool) -> tuple[str, str]:
    """The two views of revision 0002, with ``account`` as their last column or without."""
    current = f"""
CREATE VIEW queue_positions_current AS
SELECT o.order_id, o.ticker, o.subaccount_number, o.outcome_side, o.book_side,
       o.yes_price_dollars, o.remaining_count_fp, latest.queue_position, latest.captured_at
       {", o.account" if account else ""}
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
    intervals = f"""
CREATE VIEW queue_position_intervals AS
SELECT s.order_id, s.market_ticker, s.queue_position, s.captured_at,
       s.captured_at AS valid_from,
       lead(s.captured_at) OVER (PARTITION BY s.order_id ORDER BY s.captured_at) AS valid_to
       {", s.account" if account else ""}
FROM queue_position_snapshots s
"""
    return current, intervals


def owner_of_existing_rows(conn: sa.Connection) -> str | None:
    """The account the rows already stored belong to; None when there are none.

    Raises:
        ConfigError: there are rows, and sync_state names no account or several.
    """
    has_rows = conn.execute(
        sa.text(
            "SELECT EXISTS (SELECT 1 FROM orders) "
            "OR EXISTS (SELECT 1 FROM queue_position_snapshots)"
        )
    ).scalar_one()
    if not has_rows:
        return None
    chosen = os.environ.get(OVERRIDE, "").strip()
    if chosen:
        return chosen
    known = list(
        conn.execute(sa.text("SELECT DISTINCT account FROM sync_state ORDER BY account")).scalars()
    )
    if len(known) == 1:
        return str(known[0])
    found = f"it names {len(known)}: {', '.join(known)}" if known else "it names none"
    raise ConfigError(
        "cannot tell which account the stored orders belong to: sync_state should name exactly "
        f"one account, but {found}. Set {OVERRIDE} to that account (its name in the accounts "
        "file, else its API key id) and run kalshi-etl migrate again"
    )


def _add_account(table: str, owner: str | None) -> None:
    default = sa.text(f"'{owner.replace(chr(39), chr(39) * 2)}'") if owner else None
    op.add_column(table, sa.Column("account", sa.Text(), nullable=False, server_default=default))
    if owner is not None:
        op.alter_column(table, "account", existing_type=sa.Text(), server_default=None)


def upgrade() -> None:
    owner = owner_of_existing_rows(op.get_bind())
    op.execute("DROP VIEW queue_position_intervals")
    op.execute("DROP VIEW queue_positions_current")
    _add_account("orders", owner)
    _add_account("queue_position_snapshots", owner)
    op.drop_index("ix_orders_open", table_name="orders")
    op.create_index(op.f("ix_orders_account_status"), "orders", ["account", "status"])
    for view in _views(account=True):
        op.execute(view)


def downgrade() -> None:
    _refuse_to_merge_accounts()
    op.execute("DROP VIEW queue_position_intervals")
    op.execute("DROP VIEW queue_positions_current")
    op.drop_index(op.f("ix_orders_account_status"), table_name="orders")
    op.create_index(
        "ix_orders_open",
        "orders",
        ["order_id"],
        postgresql_where=sa.text("status IN ('resting', 'pending')"),
    )
    op.drop_column("queue_position_snapshots", "account")
    op.drop_column("orders", "account")
    for view in _views(account=False):
        op.execute(view)


def _refuse_to_merge_accounts() -> None:
    """Below this revision rows have no account: an upgrade would put every account's rows
    under one. Refuse while more than one account has data, unless forced
    (``KALSHI_ETL_MIGRATION_FORCE=1``, or ``force`` in the migration's config attributes)."""
    from alembic import context

    forced = context.config.attributes.get("force") or os.environ.get(
        "KALSHI_ETL_MIGRATION_FORCE", ""
    ).strip().lower() in ("1", "true", "yes")
    if forced:
        return
    names = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT account FROM orders UNION SELECT account FROM queue_position_snapshots "
                "UNION SELECT account FROM sync_state UNION SELECT account FROM sync_runs "
                "ORDER BY 1"
            )
        )
        .scalars()
        .all()
    )
    if len(names) > 1:
        raise ConfigError(
            f"downgrading below revision 0003 drops the account of every row, and "
            f"{len(names)} accounts have rows here ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}): an upgrade would then put them all under "
            "one; set KALSHI_ETL_MIGRATION_FORCE=1 to downgrade anyway"
        )
