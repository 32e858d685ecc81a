"""A short soak in `make test-long` (`make soak` runs the long one): replicas, a backfill and
several accounts under 5xx, 429, slow answers, malformed records, kill -9 and a PostgreSQL
restart converge with nothing lost (see tests/soak/driver.py for what is checked)."""

from __future__ import annotations

import os

import pytest

from tests.soak.driver import SoakConfig, run_soak


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(300)  # 20 s of faults, the calm, the catch-up, then verify of every stream
def test_a_short_soak_converges_with_nothing_lost_and_no_run_overlapping(
    tmp_path, account_keys, capsys
):
    config = SoakConfig(seconds=float(os.environ.get("KALSHI_ETL_SOAK_SECONDS", "20")))
    report = run_soak(config, tmp_path, account_keys)
    with capsys.disabled():  # the summary belongs in the CI log, passed or not
        print("\n" + "\n".join(report.lines()))
    assert report.ok, "\n".join(report.lines())
    assert report.injected["kill -9"] >= 3 and report.injected["PostgreSQL restarts"] == 1
    assert report.injected["5xx"] and report.injected["429"]
    assert report.injected["distinct malformed records"] > 0
    assert (
        report.injected["WebSocket drops"] > 0 and report.verified["accounts the stream wrote"] == 6
    )
