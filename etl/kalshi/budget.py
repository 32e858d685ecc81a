"""The key's read budget: what ``GET /account/limits`` and ``GET /account/endpoint_costs`` say.

Kalshi meters reads with a token bucket per key (KALSHI.md): a tier's ``refill_rate`` tokens a
second, at most ``bucket_capacity`` held, each call costing its endpoint's tokens (10 unless
``/account/endpoint_costs`` lists another cost; a single order 2). These functions read the
two answers into values; :class:`~etl.kalshi.client.KalshiClient` asks for them once, before
its first call, unless the budget was configured (``KALSHI_READ_TOKENS_PER_SECOND``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# The Basic tier, for a server that does not say (KALSHI.md, CONTRACT.md).
BASIC_TOKENS_PER_SECOND = 200.0
DEFAULT_COST = 10
_PREFIX = "/trade-api/v2"
_PARAM = re.compile(r"\{[^/{}]+\}")


@dataclass(frozen=True)
class Limits:
    """The read bucket of a key: tokens per second and the most it holds."""

    refill_rate: float
    bucket_capacity: float
    usage_tier: str | None = None


def read_limits(body: object) -> Limits:
    """``GET /account/limits`` → its read bucket.

    Raises:
        ValueError: the answer has no usable ``read.refill_rate`` (a positive number).
    """
    read = body.get("read") if isinstance(body, Mapping) else None
    if not isinstance(read, Mapping):
        raise ValueError("the answer has no 'read' bucket")
    rate = _number(read.get("refill_rate"))
    if rate is None or rate <= 0:
        raise ValueError(f"read.refill_rate is {read.get('refill_rate')!r}, not a positive number")
    capacity = _number(read.get("bucket_capacity"))
    tier = body.get("usage_tier") if isinstance(body, Mapping) else None
    return Limits(
        refill_rate=rate,
        bucket_capacity=capacity if capacity is not None and capacity >= rate else rate,
        usage_tier=tier if isinstance(tier, str) else None,
    )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True)
class EndpointCosts:
    """Token costs by endpoint: those listed, ``default`` for the others. ``known`` is False
    while the server has not said (the client then uses KALSHI.md's costs)."""

    default: int = DEFAULT_COST
    listed: Mapping[tuple[str, str], int] = field(default_factory=dict)
    known: bool = False

    def of(self, method: str, endpoint: str, fallback: int) -> int:
        """The cost of ``method`` on ``endpoint`` (a route such as
        ``/portfolio/orders/{order_id}``); ``fallback`` while the costs are not known."""
        if not self.known:
            return fallback
        return self.listed.get((method.upper(), _route(endpoint)), self.default)


def read_endpoint_costs(body: object) -> EndpointCosts:
    """``GET /account/endpoint_costs`` → the costs. Entries that are not
    ``{method, path, cost}`` with a non-negative integer cost are skipped.

    Raises:
        ValueError: the answer is not an object with an ``endpoint_costs`` list.
    """
    if not isinstance(body, Mapping) or not isinstance(body.get("endpoint_costs"), list):
        raise ValueError("the answer has no 'endpoint_costs' list")
    default = body.get("default_cost")
    listed: dict[tuple[str, str], int] = {}
    for entry in body["endpoint_costs"]:
        if not isinstance(entry, Mapping):
            continue
        method, path, cost = entry.get("method"), entry.get("path"), entry.get("cost")
        if not isinstance(method, str) or not isinstance(path, str):
            continue
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            continue
        listed[(method.upper(), _route(path))] = cost
    valid_default = isinstance(default, int) and not isinstance(default, bool) and default >= 0
    return EndpointCosts(
        default=default if valid_default else DEFAULT_COST,  # type: ignore[arg-type]
        listed=listed,
        known=True,
    )


def _route(path: str) -> str:
    """A route as compared: no API prefix, no trailing slash, every ``{param}`` alike."""
    path = path.split("?", 1)[0].strip()
    if path.startswith(_PREFIX):
        path = path[len(_PREFIX) :]
    path = "/" + path.strip("/")
    return _PARAM.sub("{}", path)


def client_budget(limits: Limits) -> tuple[float, float]:
    """(rate, burst) of the client's own bucket for a key's ``limits``: the refill rate, and
    at most one second of it (the server's bucket starts full, ours empty: we never ask for
    more than it holds)."""
    return limits.refill_rate, min(limits.bucket_capacity, limits.refill_rate)


def describe(limits: Limits) -> str:
    tier = f"{limits.usage_tier} tier, " if limits.usage_tier else ""
    return f"{limits.refill_rate:g} tokens/s ({tier}bucket of {limits.bucket_capacity:g})"
