"""deploy/ as far as it can be checked without a container engine: the dashboard, the alerts
and the Prometheus config name only metrics kalshi-etl exports, the dashboard's SQL runs on
the schema, the pieces agree on ports and credentials, the Dockerfile is multi-stage, non-root
and health-checked, and its build stage makes a wheel that carries the migrations."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from etl import metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\bkalshi_etl_[a-z_]+\b")


def exported_names() -> set[str]:
    """Every series name /metrics can show."""
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "kalshi-etl.json").read_text())


def targets(kind: str) -> list[dict]:
    return [
        t for p in dashboard()["panels"] for t in p["targets"] if t["datasource"]["type"] == kind
    ]


def test_the_dashboard_names_only_exported_metrics_and_covers_what_operators_watch():
    exprs = [t["expr"] for t in targets("prometheus")]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used and used <= exported_names(), used - exported_names()
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for topic in ("lag", "rows written", "api errors", "429", "open orders", "queue progress"):
        assert topic in titles, topic


def test_the_dashboards_queue_panel_runs_on_the_schema(db):
    [target] = targets("grafana-postgresql-datasource")
    sql = re.sub(
        r"\$__timeFilter\((\w+(?:\.\w+)?)\)", r"\1 > now() - interval '6 hours'", target["rawSql"]
    )
    with db.connect() as conn:
        conn.execute(sa.text(sql)).all()


def test_alerts_and_the_scrape_config_agree_with_the_daemon():
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    [target] = job["static_configs"][0]["targets"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service, port = target.split(":")
    assert service in compose["services"]
    assert compose["services"][service]["environment"]["KALSHI_ETL_METRICS_PORT"] == port
    assert f"EXPOSE {port}" in (DEPLOY / "Dockerfile").read_text()
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rules = [rule for group in alerts["groups"] for rule in group["rules"]]
    used = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert used and used <= exported_names(), used - exported_names()
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted


def test_grafana_provisioning_matches_the_dashboard_and_the_database():
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml").read_text()
    )
    by_uid = {d["uid"]: d for d in provisioned["datasources"]}
    used = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p["targets"]}
    assert used <= by_uid.keys()
    postgres = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["postgres"]
    pg = by_uid["kalshi-postgres"]
    assert pg["user"] == postgres["environment"]["POSTGRES_USER"]
    assert pg["jsonData"]["database"] == postgres["environment"]["POSTGRES_DB"]


def dockerfile_stages() -> list[list[str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_the_dockerfile_is_multi_stage_non_root_and_health_checked():
    build, final = dockerfile_stages()
    assert any("pip wheel" in line for line in build)
    user = [line for line in final if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
    [health] = [line for line in final if line.startswith("HEALTHCHECK")]
    assert "/healthz" in health and ":9464/" in health
    assert 'ENTRYPOINT ["kalshi-etl", "daemon"]' in final
    text = (DEPLOY / "Dockerfile").read_text()
    python = re.search(r"ARG PYTHON_VERSION=(\d+)\.(\d+)", text)
    assert python and (int(python[1]), int(python[2])) >= (3, 11)


def copied_sources() -> list[str]:
    build = dockerfile_stages()[0]
    sources: list[str] = []
    for line in build:
        if line.startswith("COPY ") and "--from" not in line:
            sources.extend(line.split()[1:-1])
    return sources


def test_the_docker_build_copies_what_the_package_build_reads():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    needed |= set(project["tool"]["setuptools"]["package-dir"].values())
    assert needed <= set(copied_sources())
    assert all((ROOT / source).exists() for source in copied_sources())


@pytest.mark.slow
def test_the_docker_build_stage_makes_a_wheel_with_the_migrations(tmp_path):
    """The build stage's own command, on exactly the files it copies."""
    context = tmp_path / "src"
    context.mkdir()
    for source in copied_sources():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, context / source)
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = wheels.glob("kalshi_etl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in (ROOT / "migrations" / "versions").glob("0*.py"):
        assert f"etl/_migrations/versions/{migration.name}" in names
    assert {"etl/health.py", "etl/metrics.py", "etl/_migrations/env.py"} <= names


def test_the_systemd_unit_restarts_on_failure_reads_its_env_file_and_is_hardened():
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "kalshi-etl.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"].startswith("/etc/kalshi-etl/")
    assert service["ExecStart"].endswith("kalshi-etl daemon")
    assert service["User"] != "root"
    for option in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert option in service
    example = (DEPLOY / "systemd" / "kalshi-etl.env.example").read_text()
    assert "KALSHI_API_KEY_ID=" in example and "DATABASE_URL=" in example
