"""The bench's CPU accounting: it reads Linux's /proc as the kernel writes it."""

from __future__ import annotations

import os
import sys
import time

import pytest
import sqlalchemy as sa

from bench.__main__ import _times, postgres_cpu, process_cpu

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_stat_line_is_read_past_a_name_holding_spaces_and_parentheses():
    # utime, stime, cutime, cstime are fields 14 to 17, counted after the name's last ')'.
    after_name = ["S", *["0"] * 10, "7", "5", "3", "2", *["9"] * 30]
    assert _times("4242 (odd) name (x) " + " ".join(after_name)) == 7 + 5 + 3 + 2


@linux
def test_a_process_cpu_grows_while_it_works():
    before = process_cpu(os.getpid())
    until = time.process_time() + 0.3
    while time.process_time() < until:
        pass
    after = process_cpu(os.getpid())
    assert before is not None and after is not None
    assert 0.2 <= after - before <= 5


@linux
def test_postgresql_cpu_counts_the_work_of_a_query(engine):
    before = postgres_cpu()
    if before is None:
        pytest.skip("the test database's server is not on this machine")
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT count(*) FROM generate_series(1, 5000000)")).scalar_one()
        after = postgres_cpu()
    assert after is not None and after - before >= 0.2
