"""Imports point the way the data flows (STYLE.md): kalshi → nothing but errors (and the
metrics it records); db → errors and parse records; metrics → nothing; health → db and
metrics; sync is where kalshi and db meet; nothing imports cli; config is read only by cli and
migrations; the data path never imports the simulator."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "etl"


def etl_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "etl":
            found.update(f"etl.{a.name}" for a in node.names)  # from etl import metrics
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("etl"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("etl"))
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


MODULES = {module_name(p): etl_imports(p) for p in PACKAGE.rglob("*.py")}

ALLOWED = {
    "etl.kalshi": {"etl.errors", "etl.kalshi", "etl.metrics"},
    "etl.db": {"etl.errors", "etl.db", "etl.kalshi.parse"},
    "etl.sync": {"etl.errors", "etl.db", "etl.kalshi", "etl.sync", "etl.metrics", "etl.streams"},
    # Declarations: names from parse and the tables, and the write rules as values.
    "etl.streams": {"etl.kalshi.parse", "etl.db.models", "etl.db.write", "etl.streams"},
    "etl.metrics": set(),
    "etl.health": {"etl.errors", "etl.db", "etl.metrics"},
    "etl.scheduler": {"etl.errors", "etl.sync"},
    "etl.config": {"etl.errors"},
    "etl.errors": set(),
    "etl.simulator": {"etl.errors", "etl.kalshi.auth", "etl.kalshi.client", "etl.simulator"},
}


def allowed_for(module: str) -> set[str] | None:
    for prefix, allowed in ALLOWED.items():
        if module == prefix or module.startswith(prefix + "."):
            return allowed
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_from_its_layer_or_below(module):
    allowed = allowed_for(module)
    if allowed is None:
        return  # cli, demo, __main__: composition roots
    illegal = {
        imported
        for imported in MODULES[module]
        if not any(imported == a or imported.startswith(a + ".") for a in allowed)
    }
    assert not illegal, f"{module} reaches up to {sorted(illegal)}"


def _in_cli(module: str) -> bool:
    return module == "etl.cli" or module.startswith("etl.cli.")


def test_nothing_imports_the_cli():
    importers = [
        m
        for m, imports in MODULES.items()
        if any(_in_cli(i) for i in imports) and not _in_cli(m) and m != "etl.__main__"
    ]
    assert importers == []


def test_the_data_path_never_imports_the_simulator():
    data_path = [m for m in MODULES if m.startswith(("etl.kalshi", "etl.db", "etl.sync"))]
    assert all(not any(i.startswith("etl.simulator") for i in MODULES[m]) for m in data_path)


def test_config_is_read_only_by_the_entry_points():
    readers = sorted(m for m, imports in MODULES.items() if "etl.config" in imports)
    assert readers and all(_in_cli(m) for m in readers), readers
    assert "etl.config" in etl_imports(ROOT / "migrations" / "env.py")
