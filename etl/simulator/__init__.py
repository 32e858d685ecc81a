"""The exchange simulator: a seeded in-memory :class:`Exchange` and a WSGI app serving it.

It speaks the Trade API v2 endpoints kalshi-etl reads, in the 2025 or the 2026 shapes, checks
every signature, enforces a token bucket and can inject faults. It drives the demo and the
tests and is never imported by the data path.
"""

from etl.simulator.app import SimulatorApp, serve
from etl.simulator.exchange import ApiFault, Exchange

__all__ = ["ApiFault", "Exchange", "SimulatorApp", "serve"]
