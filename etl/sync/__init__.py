"""Sync: the only place where the Kalshi client and the database meet."""
