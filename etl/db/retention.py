"""Retention: delete old queue-position snapshots in bounded batches.

A row goes when it was captured before the cutoff *and* a later row of the same order, also
captured at or before the cutoff, exists: each order's newest row at or before the cutoff
stays, whatever its age, because it gives the order's position from the cutoff up to its next
row (and each order's latest row stays: its position as of the last poll, or its closing
row). Batches walk ``(captured_at, order_id)`` upward through an index, one short transaction
each, so a prune of years of history neither holds long locks nor
rereads what it kept, and a concurrent poll is never blocked for long.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.db.engine import transaction

log = logging.getLogger(__name__)

BATCH = 5000

_BATCH_SQL = sa.text(
    """
    WITH batch AS (
        SELECT order_id, captured_at FROM queue_position_snapshots
        WHERE captured_at < :cutoff
          AND (captured_at, order_id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS text))
        ORDER BY captured_at, order_id
        LIMIT :size
    ), gone AS (
        DELETE FROM queue_position_snapshots s
        USING batch b
        WHERE s.order_id = b.order_id AND s.captured_at = b.captured_at
          AND EXISTS (
              SELECT 1 FROM queue_position_snapshots later
              WHERE later.order_id = s.order_id AND later.captured_at > s.captured_at
                AND later.captured_at <= :cutoff
          )
        RETURNING 1
    ), last AS (
        SELECT captured_at, order_id FROM batch ORDER BY captured_at DESC, order_id DESC LIMIT 1
    )
    SELECT (SELECT count(*) FROM batch) AS seen, (SELECT count(*) FROM gone) AS deleted,
           last.captured_at, last.order_id
    FROM (SELECT 1) AS one LEFT JOIN last ON true
    """
)


@dataclass(frozen=True)
class PruneResult:
    deleted: int
    kept_old: int  # rows older than the cutoff kept: each is its order's newest at the cutoff
    batches: int


def prune_snapshots(engine: Engine, *, older_than: datetime, batch: int = BATCH) -> PruneResult:
    """Delete the snapshots captured before ``older_than`` that a later row, itself captured
    at or before ``older_than``, supersedes: every position inside the kept span stays known."""
    after_at, after_id = datetime.min.replace(tzinfo=older_than.tzinfo), ""
    deleted = seen = batches = 0
    while True:
        with transaction(engine) as conn:
            row = conn.execute(
                _BATCH_SQL,
                {"cutoff": older_than, "after_at": after_at, "after_id": after_id, "size": batch},
            ).one()
        batches += 1
        seen += row.seen
        deleted += row.deleted
        if row.seen:
            log.info("prune: %d snapshot(s) deleted so far", deleted)
        if row.seen < batch:
            break
        after_at, after_id = row.captured_at, row.order_id
    return PruneResult(deleted=deleted, kept_old=seen - deleted, batches=batches)
