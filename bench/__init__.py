"""The kalshi-etl benchmark (`make bench`)."""
