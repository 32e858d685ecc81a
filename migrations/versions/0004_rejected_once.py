"""A rejected payload is kept once per stream: ``rejected_records.payload_md5``.

A record the API keeps serving and the parser keeps rejecting was inserted again on every
cycle (2,880 copies a day at 30 s). Each row now carries the MD5 of its payload (``jsonb``'s
canonical text, or ``payload_text``), unique per stream, and a write of a payload already kept
writes nothing. The upgrade fills the column and keeps the first row of each duplicate set.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 19:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PAYLOAD_MD5 = "md5(coalesce(payload::text, '') || chr(31) || coalesce(payload_text, ''))"


def upgrade() -> None:
    op.add_column("rejected_records", sa.Column("payload_md5", sa.Text(), nullable=True))
    op.execute(f"UPDATE rejected_records SET payload_md5 = {PAYLOAD_MD5}")
    op.execute(
        """
        DELETE FROM rejected_records r USING rejected_records first
        WHERE r.stream = first.stream AND r.payload_md5 = first.payload_md5 AND r.id > first.id
        """
    )
    op.alter_column("rejected_records", "payload_md5", nullable=False)
    op.create_index(
        op.f("ix_rejected_records_stream_payload_md5"),
        "rejected_records",
        ["stream", "payload_md5"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_rejected_records_stream_payload_md5"), table_name="rejected_records")
    op.drop_column("rejected_records", "payload_md5")
