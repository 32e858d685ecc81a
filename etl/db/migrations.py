"""Schema migrations: run alembic over a live connection, wherever the program runs from.

The migrations live at the project root (``migrations/``) in a source checkout and inside the
package (``etl._migrations``) in an installed wheel; either way they are located from the
package, never from the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.errors import ConfigError

if TYPE_CHECKING:  # alembic is imported only when a migration runs: it costs 0.15 s to load
    from alembic.config import Config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The newest revision of the migrations (tests/db/test_migrations.py checks it is alembic's
# head): a database already there is recognised without loading alembic at all.
HEAD: Final = "0008"


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
    from alembic.config import Config

    ini = PROJECT_ROOT / "alembic.ini"
    scripts = migrations_dir()
    config = Config(str(ini) if ini.is_file() and scripts.parent == PROJECT_ROOT else None)
    config.set_main_option("script_location", str(scripts))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """``alembic upgrade`` on ``engine``; idempotent."""
    if revision == "head" and current_revision(engine) == HEAD:
        return
    from alembic import command

    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str, *, force: bool = False) -> None:
    """``alembic downgrade``; ``force`` passes the guards that refuse to lose data (below
    0003, more than one account)."""
    from alembic import command

    config = alembic_config()
    config.attributes["force"] = force
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision ``engine``'s database is at; ``None`` before the first migration."""
    with engine.connect() as conn:
        if conn.scalar(sa.text("SELECT to_regclass('alembic_version')")) is None:
            return None
        version = conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
        return None if version is None else str(version)


def head_revision() -> str | None:
    """The newest revision of the migrations, as alembic reads them."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()
