"""kalshi-etl: keeps a Kalshi trader's orders and queue positions synced into PostgreSQL."""

__version__ = "0.1.0"
