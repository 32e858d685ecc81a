"""The Kalshi Trade API v2: request signing, the HTTP client and the record parser."""
