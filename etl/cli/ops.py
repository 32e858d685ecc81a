"""Operating the database: `migrate`, `status`, `prune`, `psql`, `accounts rename`."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.cli.wiring import (
    EXIT_UNHEALTHY,
    Commands,
    Parser,
    database_lines,
    duration,
    open_engine,
)
from etl.config import Settings
from etl.db import migrations
from etl.db.engine import (
    connection,
    libpq_target,
    mask,
    psql_executable,
    transaction,
)
from etl.db.models import (
    archived_positions,
    balance_snapshots,
    cash_movements,
    fills,
    orders,
    position_snapshots,
    queue_position_snapshots,
    rejected_records,
    settlements,
    sync_runs,
    sync_state,
)
from etl.db.state import stream_health
from etl.errors import (
    ConfigError,
    LockBusyError,
)
from etl.streams.registry import CHANNEL_OF


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    engine = open_engine(settings)
    migrations.upgrade(engine)
    print(f"{mask(engine.url)} is at revision {migrations.current_revision(engine)} (head)")
    return 0


def cmd_accounts_rename(args: argparse.Namespace, settings: Settings) -> int:
    """Move every row of account OLD to NEW in one transaction, under both names' locks."""
    from etl.db.accounts import rename_account
    from etl.db.engine import stream_lock

    engine = open_engine(settings, migrate=True)
    with contextlib.ExitStack() as locks:
        for name in (args.old, args.new):
            for stream in ("orders", "queue_positions"):
                try:
                    locks.enter_context(stream_lock(engine, name, stream, wait=0))
                except LockBusyError as exc:
                    raise ConfigError(
                        f"accounts rename: {exc}; stop the daemon (and any sync) of {name} first"
                    ) from None
        with transaction(engine) as conn:
            moved = rename_account(conn, args.old, args.new)
    total = sum(moved.values())
    detail = ", ".join(f"{table} {n}" for table, n in moved.items() if n)
    print(f"renamed account {args.old} to {args.new}: {total} rows ({detail})")
    return 0


def cmd_accounts_help(args: argparse.Namespace, settings: Settings) -> int:
    raise ConfigError("accounts: give a subcommand, e.g. kalshi-etl accounts rename OLD NEW")


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from etl.db.retention import prune_snapshots

    engine = open_engine(settings, migrate=True)
    cutoff = datetime.now(UTC) - args.snapshots_older_than
    result = prune_snapshots(engine, older_than=cutoff)
    print(
        f"pruned {result.deleted} queue-position snapshot(s) captured before "
        f"{cutoff.isoformat(timespec='seconds')} in {result.batches} batch(es); each order's "
        f"newest row at the cutoff is kept ({result.kept_old} of them older than that)"
    )
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    engine = open_engine(settings)
    for line in database_lines(settings, engine):
        print(line)
    if migrations.current_revision(engine) is None:
        print("no kalshi-etl schema yet: run kalshi-etl migrate")
        return EXIT_UNHEALTHY if args.max_age is not None else 0
    if args.account is not None and migrations.current_revision(engine) != (
        migrations.head_revision()
    ):
        raise ConfigError("--account needs the current schema: run kalshi-etl migrate first")
    if args.account is not None:
        _known_account(settings, engine, args.account)
    for line in status_lines(engine, args.account):
        print(line)
    with connection(engine) as conn:
        health = stream_health(
            conn, now=datetime.now(UTC), max_age=args.max_age, account=args.account
        )
    problems = [h for h in health if h.problem is not None]
    if args.max_age is not None and not health:
        print("health      UNHEALTHY: no sync has run yet")
        return EXIT_UNHEALTHY
    for item in problems:
        print(f"health      UNHEALTHY: {item.stream} (account {item.account}) {item.problem}")
    if problems:
        return EXIT_UNHEALTHY
    print("health      ok")
    return 0


def _known_account(settings: Settings, engine: Engine, name: str) -> None:
    """``--account NAME`` of a command that reads only: the name must be configured or have
    data in the database, so that a typo is an error and not a healthy "nothing yet".

    Raises:
        ConfigError: naming the accounts there are.
    """
    configured = [a.name for a in settings.accounts()]
    with connection(engine) as conn:
        stored = [
            row[0]
            for row in conn.execute(
                sa.text(
                    "SELECT account FROM sync_state UNION SELECT account FROM sync_runs "
                    "UNION SELECT DISTINCT account FROM orders ORDER BY 1"
                )
            )
        ]
    if name in configured or name in stored:
        return
    known = sorted(set(configured) | set(stored))
    where = f"in {settings.accounts_file} or " if settings.accounts_file else ""
    raise ConfigError(
        f"--account {name}: no such account {where}in the database; the accounts are: "
        + (", ".join(known) if known else "none yet")
    )


def status_lines(engine: Engine, account: str | None = None) -> list[str]:
    """The report of ``kalshi-etl status``: streams, their last runs, table sizes (of
    ``account`` only, when given)."""
    lines: list[str] = []

    def of(table: sa.Table) -> list[sa.ColumnElement[bool]]:
        return [] if account is None else [table.c.account == account]

    with engine.connect() as conn:
        states = conn.execute(
            sa.select(sync_state).where(*of(sync_state)).order_by("account", "stream")
        ).all()
        latest = (
            sa.select(sa.func.max(sync_runs.c.id))
            .where(*of(sync_runs))
            .group_by(sync_runs.c.account, sync_runs.c.stream)
        )
        last_runs = {
            (r.account, r.stream): r
            for r in conn.execute(sa.select(sync_runs).where(sync_runs.c.id.in_(latest)))
        }
        keys = sorted(
            {(s.account, s.stream) for s in states if ":" not in s.stream} | set(last_runs)
        )
        if not keys:
            lines.append("no sync has run yet")
        by_key = {(s.account, s.stream): s for s in states}
        for key in keys:
            state, run = by_key.get(key), last_runs.get(key)
            wm = state.watermark.isoformat() if state and state.watermark else "none"
            lines.append(f"{key[1]} (account {key[0]})")
            lines.append(f"  watermark   {wm}")
            if run is not None:
                took = (
                    f"{(run.finished_at - run.started_at).total_seconds():.1f}s"
                    if run.finished_at
                    else "still running"
                )
                lines.append(
                    f"  last run    #{run.id} {run.mode} {run.status} at "
                    f"{run.started_at.isoformat(timespec='seconds')} ({took})"
                )
                lines.append(
                    f"  counts      fetched {run.fetched}, inserted {run.inserted}, updated "
                    f"{run.updated}, unchanged {run.unchanged}, rejected {run.rejected}"
                )
                if run.error:
                    lines.append(f"  error       {run.error}")
        for state in states:
            channel = CHANNEL_OF.get(state.stream.removesuffix(":stream"))
            if state.stream.endswith(":stream") and channel and state.watermark is not None:
                lines.append(f"{channel} stream (account {state.account})")
                lines.append(
                    f"  last change {state.watermark.isoformat()} (committed "
                    f"{state.updated_at.isoformat(timespec='seconds')})"
                )
        lines.append("rows" if account is None else f"rows of account {account}")
        for table in (
            orders,
            queue_position_snapshots,
            fills,
            settlements,
            position_snapshots,
            archived_positions,
            balance_snapshots,
            cash_movements,
            sync_runs,
            sync_state,
            rejected_records,
        ):
            count = conn.execute(
                sa.select(sa.func.count()).select_from(table).where(*of(table))
            ).scalar_one()
            lines.append(f"  {table.name:<26}{count}")
        open_count = conn.execute(
            sa.select(sa.func.count())
            .select_from(orders)
            .where(orders.c.status == "resting", *of(orders))
        ).scalar_one()
        lines.append(f"  {'(resting orders)':<26}{open_count}")
    return lines


def cmd_psql(args: argparse.Namespace, settings: Settings) -> int:
    """Open psql on the database (starting the embedded one for as long as psql runs)."""
    engine = open_engine(settings)
    target, secret = libpq_target(engine.url)
    command = [psql_executable(), target, *args.psql_args]
    engine.dispose()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to psql
    try:
        return subprocess.call(command, env={**os.environ, **secret})
    finally:
        signal.signal(signal.SIGINT, previous)


def register_migrate(commands: Commands) -> None:
    """Add ``migrate``, the first command of the help."""
    commands.add("migrate", cmd_migrate, "create or upgrade the schema (alembic upgrade head)")


def register(commands: Commands) -> None:
    """Add this module's other commands to the parser."""
    p = commands.add(
        "prune",
        cmd_prune,
        "delete old queue-position snapshots in batches, keeping each order's newest row at the "
        "cutoff",
    )
    p.add_argument(
        "--snapshots-older-than",
        type=duration,
        required=True,
        metavar="D",
        help="age of the snapshots to delete, e.g. 90d",
    )

    p = commands.add_for_accounts(
        "status", cmd_status, "watermarks, last runs, row counts and health"
    )
    p.add_argument(
        "--max-age",
        type=duration,
        default=None,
        help="exit 1 also when a stream has not succeeded for this long, e.g. 5m",
    )

    p = commands.add("accounts", cmd_accounts_help, "manage account names in the database")
    accounts_sub = p.add_subparsers(
        dest="accounts_command", required=True, metavar="SUBCOMMAND", parser_class=Parser
    )
    p = accounts_sub.add_parser(
        "rename",
        parents=[commands.common],
        help="move every row of account OLD to the name NEW (one transaction)",
        description="Move every row of account OLD to the name NEW, in every table with an "
        "account column, in one transaction: for a key first synced under another name (the "
        "key id, before an accounts file). Stop the daemon first.",
    )
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p.set_defaults(func=cmd_accounts_rename)

    p = commands.add("psql", cmd_psql, "open psql on the database (the embedded one included)")
    p.set_defaults(psql_args=[])
    p.epilog = "Everything after `psql` goes to psql itself, e.g. kalshi-etl psql -c 'SELECT 1'."
