"""Raw API JSON → typed records, one module per record kind. Pure.

A parser returns its record, or a :class:`Rejected` value with a precise reason: it never
raises for bad data, since one broken record must not cost the rest of its page. The payload
travels with the record (``raw``), unknown fields included. :mod:`~etl.kalshi.parse.fields`
holds what the kinds share: the field readers and the checks that keep what PostgreSQL cannot
store out of the tables.
"""

from etl.kalshi.parse.fields import (
    INT4_MAX,
    INT4_MIN,
    MAX_DEPTH,
    MAX_KEY_LENGTH,
    RecordError,
    Rejected,
    direction,
    escaped_text,
    plain_body,
    screened_body,
    storable_text,
    storage_problem,
)
from etl.kalshi.parse.fills import FILL_COLUMNS, Fill, parse_fill
from etl.kalshi.parse.orders import (
    OPEN_STATUSES,
    ORDER_STATUSES,
    STREAM_LACKS,
    Order,
    _order,
    _plain_order,
    parse_order,
    parse_user_order,
)
from etl.kalshi.parse.queue import QueuePosition, parse_queue_position
from etl.kalshi.parse.settlements import SETTLEMENT_COLUMNS, Settlement, parse_settlement

__all__ = [
    "FILL_COLUMNS",
    "SETTLEMENT_COLUMNS",
    "Fill",
    "Settlement",
    "parse_fill",
    "parse_settlement",
    "INT4_MAX",
    "INT4_MIN",
    "MAX_DEPTH",
    "MAX_KEY_LENGTH",
    "OPEN_STATUSES",
    "ORDER_STATUSES",
    "STREAM_LACKS",
    "Order",
    "QueuePosition",
    "RecordError",
    "Rejected",
    "_order",
    "_plain_order",
    "direction",
    "escaped_text",
    "parse_order",
    "parse_queue_position",
    "parse_user_order",
    "plain_body",
    "screened_body",
    "storable_text",
    "storage_problem",
]
