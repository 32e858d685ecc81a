"""Schema migrations: run alembic over a live connection, wherever the program runs from.

The migrations live at the project root (``migrations/``) in a source checkout and inside the
package (``etl._migrations``) in an installed wheel; either way they are located from the
package, never from the working directory.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from etl.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def migrations_dir() -> Path:
    """The folder of the alembic scripts: the source tree's, else the installed package's."""
    source = PROJECT_ROOT / "migrations"
    if (source / "env.py").is_file():
        return source
    installed = Path(__file__).resolve().parents[1] / "_migrations"
    if (installed / "env.py").is_file():
        return installed
    raise ConfigError(
        f"cannot find the alembic migrations (looked in {source} and {installed}); "
        "reinstall kalshi-etl"
    )


def alembic_config() -> Config:
    """An alembic Config pointing at this project's migrations."""
    ini = PROJECT_ROOT / "alembic.ini"
    scripts = migrations_dir()
    config = Config(str(ini) if ini.is_file() and scripts.parent == PROJECT_ROOT else None)
    config.set_main_option("script_location", str(scripts))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade`` on ``engine``; idempotent."""
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
