"""Queue positions: one entry of ``GET /portfolio/orders/queue_positions`` → a
:class:`QueuePosition` or a :class:`Rejected`. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from etl.kalshi.parse.fields import (
    _COUNT_PLACES,
    _NUMERIC_LIMIT,
    _ZERO,
    MAX_KEY_LENGTH,
    RecordError,
    Rejected,
    _decimal,
    _fp_from_count,
    _int,
    _rejected,
    _text,
    storage_problem,
)


@dataclass(frozen=True)
class QueuePosition:
    """One entry of ``GET /portfolio/orders/queue_positions``."""

    order_id: str
    market_ticker: str
    queue_position: Decimal
    raw: Mapping[str, Any]


def parse_queue_position(raw: Any) -> QueuePosition | Rejected:
    """Parse one queue-position entry (``queue_position`` int in 2025, ``queue_position_fp``
    decimal string in 2026)."""
    if not isinstance(raw, dict):
        return _rejected(f"expected a JSON object, got {type(raw).__name__}", raw)
    problem = storage_problem(raw)
    if problem is not None:
        return _rejected(problem, raw)
    try:
        order_id = _text(raw, "order_id", required=True, max_length=MAX_KEY_LENGTH)
        ticker = _text(raw, "market_ticker", required=True, max_length=MAX_KEY_LENGTH)
        assert order_id is not None and ticker is not None
        position = _decimal(raw, "queue_position_fp", places=_COUNT_PLACES, minimum=_ZERO)
        if position is None:
            position = _fp_from_count(
                _int(
                    raw, "queue_position", minimum=0, maximum=int(_NUMERIC_LIMIT[_COUNT_PLACES]) - 1
                )
            )
        if position is None:
            raise RecordError("missing required field 'queue_position_fp' (or 'queue_position')")
    except RecordError as exc:
        return Rejected(str(exc), raw)
    return QueuePosition(order_id=order_id, market_ticker=ticker, queue_position=position, raw=raw)
