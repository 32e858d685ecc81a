"""The simulator's error answer, shared by the exchange, its ledger and the app."""

from __future__ import annotations


class ApiFault(Exception):
    """An error answer: HTTP status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
