"""The soak: several accounts, daemon replicas and a backfill under faults and kills.

A simulator serves N accounts (each with its own key) with 5xx, 429, slow answers and
always-malformed orders, while it trades; its WebSocket drops every connection every few
seconds and duplicates and reorders messages, for the replica that streams (``--realtime``).
Against a PostgreSQL of its own (embedded, so that it can be stopped and started again),
R ``kalshi-etl daemon`` replicas and one ``kalshi-etl backfill`` run as subprocesses. A
driver kill -9s one of them at random moments; a supervisor restarts whatever exits, as
systemd's ``Restart=`` would; PostgreSQL is stopped and started once. Then trading pauses,
the daemons catch up and are stopped with
SIGTERM, and the checks run:

- ``kalshi-etl verify`` passes for every account (exit 0);
- every malformed record the simulator serves is in ``rejected_records``;
- no (account, stream) had two runs overlapping in ``sync_runs``, and none is left running;
- every daemon exited 0 within 10 s of SIGTERM.

``python -m tests.soak.driver --seconds 600`` is ``make soak``; ``tests/soak/test_soak.py``
runs a short one in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa

from etl.db import migrations
from etl.db.engine import create_engine
from etl.simulator.app import Faults
from etl.simulator.keys import generate_key, private_pem
from tests.fix_db import start_embedded
from tests.fix_exchange import CLI, LiveAccounts, serve_accounts, sim_accounts


@dataclass
class SoakConfig:
    seconds: float = 30.0
    accounts: int = 6
    replicas: int = 3
    orders: int = 300  # per account at the start
    events_per_second: float = 2.0  # per account
    interval: str = "1s"  # --orders-every, --queue-every, --fills-every, --settlements-every
    error_rate: float = 0.05
    throttle_rate: float = 0.02
    slow_rate: float = 0.05
    slow_seconds: float = 0.3
    malformed: float = 0.02
    kill_every: tuple[float, float] = (1.0, 4.0)  # seconds between kill -9s, at random
    seed: int = 7
    realtime: int = 1  # how many of the replicas also stream user_orders (--realtime)
    stream_drop_every: tuple[float, float] = (2.0, 8.0)  # seconds between WebSocket drops
    stream_duplicate_rate: float = 0.05
    stream_reorder_rate: float = 0.05


@dataclass
class Process:
    """A supervised ``kalshi-etl`` process; ``once`` = done after its first exit 0."""

    name: str
    args: list[str]
    once: bool = False
    popen: subprocess.Popen[bytes] | None = None
    log: TextIO | None = None
    done: bool = False
    starts: int = 0
    exits: Counter[int] = field(default_factory=Counter)


class Supervisor:
    """Starts processes, restarts the ones that exit (after ``delay``), kills on demand."""

    def __init__(self, env: dict[str, str], folder: Path, delay: float = 0.5) -> None:
        self.env = env
        self.folder = folder
        self.delay = delay
        self.processes: list[Process] = []
        self.kills = 0
        self._dead_since: dict[str, float] = {}

    def add(self, process: Process) -> None:
        self.processes.append(process)
        self._start(process)

    def _start(self, process: Process) -> None:
        if process.log is None:
            process.log = open(self.folder / f"{process.name}.log", "a")  # noqa: SIM115
        process.popen = subprocess.Popen(
            [*CLI, *process.args], env=self.env, stdout=process.log, stderr=subprocess.STDOUT
        )
        process.starts += 1

    def tend(self) -> None:
        """Restart whatever exited (a finished one-off stays done)."""
        now = time.monotonic()
        for process in self.processes:
            if process.done or process.popen is None:
                continue
            code = process.popen.poll()
            if code is None:
                continue
            if process.name not in self._dead_since:
                process.exits[code] += 1
                self._dead_since[process.name] = now
            if code == 0 and process.once:
                process.done = True
            elif now - self._dead_since[process.name] >= self.delay:
                del self._dead_since[process.name]
                self._start(process)

    def kill_one(self, rng: random.Random) -> str | None:
        alive = [p for p in self.processes if p.popen is not None and p.popen.poll() is None]
        if not alive:
            return None
        victim = rng.choice(alive)
        assert victim.popen is not None
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait()
        self.kills += 1
        return victim.name

    def stop(self, process: Process, timeout: float = 10.0) -> tuple[int | None, float]:
        """SIGTERM; the exit code and how long it took (None: still running, killed)."""
        assert process.popen is not None
        started = time.monotonic()
        process.popen.send_signal(signal.SIGTERM)
        try:
            code: int | None = process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()
            code = None
        process.done = True
        return code, time.monotonic() - started

    def close(self) -> None:
        for process in self.processes:
            if process.popen is not None and process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait()
            if process.log is not None:
                process.log.close()


@dataclass
class SoakReport:
    config: SoakConfig
    injected: dict[str, int]
    verified: dict[str, Any]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        c = self.config
        out = [
            f"soak: {c.seconds:.0f}s, {c.accounts} accounts, {c.replicas} daemon replicas "
            f"({c.realtime} streaming user_orders) and a backfill, {c.events_per_second:g} "
            "trading events/s per account",
            "injected: " + ", ".join(f"{k} {v}" for k, v in self.injected.items()),
            "verified: " + ", ".join(f"{k} {v}" for k, v in self.verified.items()),
        ]
        out += [f"PROBLEM: {p}" for p in self.problems] or ["result: every check passed"]
        return out


def restart_postgres(server: Any, down: float) -> None:
    """Stop the embedded PostgreSQL (fast shutdown: sessions cut), wait, start it again."""
    from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    time.sleep(down)
    server.ensure_postgres_running()


def run_soak(
    config: SoakConfig,
    folder: Path,
    keys: list[tuple[rsa.RSAPrivateKey, Path]],
    *,
    say: Any = print,
) -> SoakReport:
    rng = random.Random(config.seed)
    (folder / "pg").mkdir(exist_ok=True)
    url, handle = start_embedded(folder / "pg")
    server: Any = handle
    engine = create_engine(url)
    try:
        migrations.upgrade(engine)
        accounts = sim_accounts(
            keys,
            config.accounts,
            orders=config.orders,
            events_per_second=config.events_per_second,
            malformed=config.malformed,
        )
        faults = Faults(
            error_rate=config.error_rate,
            throttle_rate=config.throttle_rate,
            slow_rate=config.slow_rate,
            slow_seconds=config.slow_seconds,
        )
        with serve_accounts(accounts, folder, url, faults=faults, seed=config.seed) as live:
            return _soak(config, folder, live, server, engine, rng, say)
    finally:
        engine.dispose()
        server.cleanup()


def _soak(
    config: SoakConfig,
    folder: Path,
    live: LiveAccounts,
    server: Any,
    engine: sa.Engine,
    rng: random.Random,
    say: Any,
) -> SoakReport:
    env = {**live.env, "KALSHI_ETL_LOG_FORMAT": "text"}
    supervisor = Supervisor(env, folder)
    problems: list[str] = []
    every = [
        f"--{stream}-every={config.interval}"
        for stream in ("orders", "queue", "fills", "settlements")
    ]
    since = (datetime.now(UTC) - timedelta(days=65)).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        for n in range(1, config.replicas + 1):
            realtime = ["--realtime"] if n <= config.realtime else []
            supervisor.add(Process(f"daemon-{n}", ["daemon", *every, *realtime]))
        stream = live.app.stream
        stream.faults.duplicate_rate = config.stream_duplicate_rate
        stream.faults.reorder_rate = config.stream_reorder_rate
        supervisor.add(
            Process(
                "backfill",
                ["backfill", "--since", since, "--window", "7d", "--concurrency", "2"],
                once=True,
            )
        )
        started = time.monotonic()
        restarted_db = False
        next_kill = started + rng.uniform(*config.kill_every)
        next_drop = started + rng.uniform(*config.stream_drop_every)
        drops = 0
        while time.monotonic() - started < config.seconds:
            supervisor.tend()
            now = time.monotonic()
            if now >= next_kill:
                victim = supervisor.kill_one(rng)
                say(f"  {now - started:5.1f}s kill -9 {victim}")
                next_kill = now + rng.uniform(*config.kill_every)
            if config.realtime and now >= next_drop:
                stream.drop()  # whatever is connected then (maybe nothing: a replica killed)
                drops += 1
                next_drop = now + rng.uniform(*config.stream_drop_every)
            if not restarted_db and now - started >= config.seconds * 0.4:
                say(f"  {now - started:5.1f}s PostgreSQL stopped")
                restart_postgres(server, down=2.0)
                restarted_db = True
                say(f"  {time.monotonic() - started:5.1f}s PostgreSQL started again")
            time.sleep(0.1)

        # Calm: no more kills; the backfill finishes; trading pauses; the daemons catch up.
        backfill = next(p for p in supervisor.processes if p.name == "backfill")
        deadline = time.monotonic() + 120
        while not backfill.done and time.monotonic() < deadline:
            supervisor.tend()
            time.sleep(0.2)
        if not backfill.done:
            problems.append("the backfill did not finish within 120 s of the calm")
        live.app.pause()
        catch_up = 6 * float(config.interval.rstrip("s")) + 4
        end = time.monotonic() + catch_up
        while time.monotonic() < end:
            supervisor.tend()
            time.sleep(0.2)
        stream.faults.duplicate_rate = stream.faults.reorder_rate = 0.0
        stops = [
            (p.name, *supervisor.stop(p)) for p in supervisor.processes if p.name != "backfill"
        ]
        for name, code, took in stops:
            if code != 0 or took > 10:
                problems.append(f"{name} exited {code} {took:.1f}s after SIGTERM (want 0, <10s)")

        verify = subprocess.run(
            [*CLI, "verify"], env=env, capture_output=True, text=True, timeout=300
        )
        (folder / "verify.log").write_text(verify.stdout + verify.stderr)
        if verify.returncode != 0:
            problems.append(f"verify exited {verify.returncode}:\n{verify.stdout}{verify.stderr}")
        verified = _check_tables(engine, live, problems, realtime=config.realtime > 0)
        verified["verify exit"] = verify.returncode
        verified["daemon stops"] = ", ".join(f"{code} in {took:.1f}s" for _, code, took in stops)
        injected = {
            "kill -9": supervisor.kills,
            "PostgreSQL restarts": 1 if restarted_db else 0,
            "process restarts": sum(p.starts - 1 for p in supervisor.processes),
            "5xx": live.app.injected["5xx"],
            "429": live.app.injected["429"],
            "slow answers": live.app.injected["slow"],
            "malformed records served": live.app.injected["malformed"],
            "distinct malformed records": sum(
                len(a.exchange.malformed_records()) for a in live.accounts
            ),
            "WebSocket drops": drops,
            "connections cut": stream.counts["dropped"],
            "stream messages": stream.counts["messages"],
            "duplicated": stream.counts["duplicated"],
            "reordered": stream.counts["reordered"],
            "subscriptions": stream.counts["subscriptions"],
        }
        exits: Counter[int] = Counter()
        for p in supervisor.processes:
            exits.update(p.exits)
        injected["process exits by code"] = dict(sorted(exits.items()))  # type: ignore[assignment]
        return SoakReport(config, injected, verified, problems)
    finally:
        supervisor.close()


def overlapping_runs(engine: sa.Engine) -> list[Any]:
    """Runs that started before the previous run of their (account, stream) had finished."""
    with engine.connect() as conn:
        return list(
            conn.exec_driver_sql(
                """
                SELECT account, stream, id, prev_id FROM (
                    SELECT account, stream, id, started_at,
                           lag(id) OVER w AS prev_id, lag(finished_at) OVER w AS prev_finished
                    FROM sync_runs
                    WINDOW w AS (PARTITION BY account, stream ORDER BY started_at, id)
                ) r
                WHERE started_at < prev_finished OR (prev_id IS NOT NULL AND prev_finished IS NULL)
                """
            )
        )


def _check_tables(
    engine: sa.Engine, live: LiveAccounts, problems: list[str], *, realtime: bool
) -> dict[str, Any]:
    overlaps = overlapping_runs(engine)
    with engine.connect() as conn:
        running = conn.exec_driver_sql(
            "SELECT count(*) FROM sync_runs WHERE status = 'running'"
        ).scalar_one()
        runs: dict[str, int] = dict(
            conn.exec_driver_sql("SELECT status, count(*) FROM sync_runs GROUP BY status").all()
        )
        rejected = {
            (row.account, row.order_id)
            for row in conn.exec_driver_sql(
                "SELECT account, payload->>'order_id' AS order_id FROM rejected_records "
                "WHERE stream = 'orders'"
            )
        }
        stored: dict[str, int] = dict(
            conn.exec_driver_sql("SELECT account, count(*) FROM orders GROUP BY account").all()
        )
        streamed = {
            row[0]
            for row in conn.exec_driver_sql(
                "SELECT account FROM sync_state WHERE stream = 'orders:stream'"
            )
        }
    if overlaps:
        problems.append(f"{len(overlaps)} runs overlapped another of their stream: {overlaps[:3]}")
    if running:
        problems.append(f"{running} runs are still marked running after every process stopped")
    unrecorded = [
        (a.name, order_id)
        for a in live.accounts
        for order_id in a.exchange.malformed_records()
        if (a.name, order_id) not in rejected
    ]
    if unrecorded:
        problems.append(f"{len(unrecorded)} malformed records not in rejected_records")
    for a in live.accounts:
        if stored.get(a.name, 0) != len(a.exchange.truth()):
            problems.append(
                f"{a.name}: orders holds {stored.get(a.name, 0)}, the exchange "
                f"{len(a.exchange.truth())}"
            )
    if realtime and streamed != {a.name for a in live.accounts}:
        problems.append(
            f"the stream committed nothing for {sorted(streamed ^ {a.name for a in live.accounts})}"
        )
    return {
        "accounts": len(live.accounts),
        "accounts the stream wrote": len(streamed),
        "orders": sum(stored.values()),
        "malformed records in rejected_records": sum(
            len(a.exchange.malformed_records()) for a in live.accounts
        )
        - len(unrecorded),
        "runs": json.dumps(runs),
        "overlapping runs": len(overlaps),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--accounts", type=int, default=6)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    config = SoakConfig(
        seconds=args.seconds, accounts=args.accounts, replicas=args.replicas, seed=args.seed
    )
    os.environ.setdefault("KALSHI_ETL_HOME", tempfile.mkdtemp(prefix="ketl-soak-home-"))
    folder = Path(tempfile.mkdtemp(prefix="ketl-soak-"))
    keys = []
    for n in range(config.accounts):
        key = generate_key()
        path = folder / f"account{n}.pem"
        path.write_bytes(private_pem(key))
        path.chmod(0o600)
        keys.append((key, path))
    print(f"soak in {folder} (process logs there)", flush=True)
    report = run_soak(config, folder, keys, say=lambda line: print(line, flush=True))
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
