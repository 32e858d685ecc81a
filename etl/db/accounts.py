"""Account names and the keys behind them: one Kalshi key is synced under one name.

The ``account`` column of every table is a name (the key id when there is no accounts file).
A key synced under two names would leave each name's rows to itself: the open orders of one
never settled by the other's cycles, and ``verify`` of each calling the other's orders stale.
So the key of each name is recorded (``sync_state`` row ``account:key``) and
:func:`claim_keys` refuses a name whose key another name already holds; the user renames the
old name instead (:func:`rename_account`, one transaction over every table with an
``account`` column).

:func:`claim_keys` also keeps the simulator's data out of a database that holds a real
account's: a simulator key (``sim-…``) is refused there unless the caller allows it.

Every function runs in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection

from etl.db.models import metadata, sync_state
from etl.errors import ConfigError

KEY_STREAM = "account:key"  # the sync_state row recording which key an account name syncs
SIMULATED_PREFIX = "sim-"  # the simulator's key ids (etl.simulator.keys)


@dataclass(frozen=True)
class Claim:
    """A configured account: its name in the tables and its key id."""

    name: str
    key_id: str


def stored_accounts(conn: Connection) -> dict[str, str | None]:
    """Every account name with rows in ``sync_state`` or ``sync_runs`` (every sync writes
    there), and the key recorded for it (``None`` when a release before this one wrote it)."""
    rows = conn.execute(
        sa.text(
            """
            SELECT n.account, k.state ->> 'key_id' AS key_id
            FROM (SELECT account FROM sync_state UNION SELECT account FROM sync_runs) AS n
            LEFT JOIN sync_state k ON k.account = n.account AND k.stream = :stream
            """
        ),
        {"stream": KEY_STREAM},
    )
    return {row.account: row.key_id for row in rows}


def _holder(stored: dict[str, str | None], claim: Claim) -> str | None:
    """The other name under which ``claim``'s key was synced, if any."""
    for name, key in sorted(stored.items()):
        if name == claim.name:
            continue
        if key == claim.key_id or (key is None and name == claim.key_id):
            return name
    return None


def _is_real(name: str, key: str | None, ours: set[str]) -> bool:
    """Whether account ``name`` (its recorded ``key``) is a real Kalshi account's data."""
    if key is not None:
        return not key.startswith(SIMULATED_PREFIX)
    if name in ours:  # a name this run syncs, written before keys were recorded
        return False
    return not name.startswith(SIMULATED_PREFIX)


def claim_keys(conn: Connection, claims: Sequence[Claim], *, allow_simulated: bool = False) -> None:
    """Check that each key is synced under its name alone (and, for a simulator key, that the
    database holds no real account's data), then record each name's key.

    Raises:
        ConfigError: naming both names and how to rename, or the real accounts found.
    """
    if not claims:
        return
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:what))"), {"what": KEY_STREAM})
    stored = stored_accounts(conn)
    for claim in claims:
        other = _holder(stored, claim)
        if other is not None:
            raise ConfigError(
                f"the key {claim.key_id} of account {claim.name!r} is already synced in this "
                f"database under the account name {other!r}; to keep one name for its rows, "
                f"run: kalshi-etl accounts rename {other} {claim.name} (or name the account "
                f"{other!r} again)"
            )
    simulated = [c for c in claims if c.key_id.startswith(SIMULATED_PREFIX)]
    if simulated and not allow_simulated:
        ours = {c.name for c in claims}
        real = sorted(name for name, key in stored.items() if _is_real(name, key, ours))
        if real:
            raise ConfigError(
                f"the database holds data of a real Kalshi account ({', '.join(real)}) and the "
                f"key {simulated[0].key_id} is the simulator's: simulated orders would sit "
                "beside real ones; point DATABASE_URL at another database, or pass "
                "--allow-simulated to write them anyway"
            )
    for claim in claims:
        if stored.get(claim.name, "") == claim.key_id:
            continue
        stmt = pg_insert(sync_state).values(
            account=claim.name,
            stream=KEY_STREAM,
            watermark=None,
            state={"key_id": claim.key_id},
            updated_at=sa.func.now(),
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[sync_state.c.account, sync_state.c.stream],
                set_={"state": stmt.excluded.state, "updated_at": stmt.excluded.updated_at},
            )
        )


def rename_account(conn: Connection, old: str, new: str) -> dict[str, int]:
    """Move every row of account ``old`` to ``new``, in every table with an ``account``
    column; returns the rows moved per table. Where the account is part of a table's key and
    ``new`` already has the row (a ``sync_state`` stream, a settlement), ``new``'s is kept.

    Raises:
        ConfigError: ``old`` has no rows, or the names are the same.
    """
    if old == new:
        raise ConfigError(f"accounts rename: {old!r} is already the name")
    moved: dict[str, int] = {}
    for table in metadata.sorted_tables:
        # Where the account is part of the key (sync_state, settlements), a row ``new`` has
        # already wins over ``old``'s: it was written by the newer syncs.
        keys = [c.name for c in table.primary_key.columns]
        if "account" in keys:
            same = " AND ".join(f"n.{c} = o.{c}" for c in keys if c != "account")
            conn.execute(
                sa.text(
                    f"DELETE FROM {table.name} o WHERE o.account = :old AND EXISTS "
                    f"(SELECT 1 FROM {table.name} n WHERE n.account = :new AND {same})"
                ),
                {"old": old, "new": new},
            )
    for table in metadata.sorted_tables:
        if "account" not in table.c:
            continue
        result = conn.execute(sa.update(table).where(table.c.account == old).values(account=new))
        moved[table.name] = result.rowcount
    if not any(moved.values()):
        raise ConfigError(
            f"accounts rename: the database has no rows of account {old!r}; the accounts "
            "are: " + (", ".join(sorted(stored_accounts(conn))) or "none yet")
        )
    return moved
