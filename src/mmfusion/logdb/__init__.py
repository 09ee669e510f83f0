"""Where the inference log lives: a SQLAlchemy URL, and one versioned schema for SQLite and PostgreSQL.

    sqlite:///logs/inference.sqlite          the embedded default: one file, WAL mode (relative to the project root)
    postgresql+psycopg://user:pw@host/db      one log for many replicas (a plain path is a SQLite file)

The service, `/feedback`, the monitor, export and promotion all open the log through here. The
schema is created and migrated by Alembic (`mmfusion/logdb/migrations`, its own version table
`mmfusion_log_version`, so the log can share a database with Prefect's server, whose Alembic table is
`alembic_version`). A log file written before the schema was versioned is brought forward in place,
without losing a row. The per-modality statistic columns (`ModalitySpec.stats`, `log_fields`) are the
registry's, not the schema's: they are added when a modality first appears (columns are only ever
added), typed by `ModalitySpec.column_type`.

A URL is printed with its password masked (`masked`): a secret never lands in logs or reports.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///logs/inference.sqlite"
URL_ENV = "MMFUSION_INFERENCE_LOG"  # a deployment's override of package.log.url (a URL or a SQLite file path)
VERSION_TABLE = "mmfusion_log_version"
MIGRATIONS = Path(__file__).parent / "migrations"
SQL_TYPES = {"float": sa.Float(53), "int": sa.BigInteger(), "text": sa.Text()}
_ENGINES: dict[tuple[str, bool, int], Engine] = {}
_ENGINES_LOCK = threading.Lock()
_UPGRADED: dict[str, str] = {}  # URL -> the revision this process migrated it to


class LogUnavailable(RuntimeError):
    """The log's database cannot be reached or read: one line naming the (masked) URL and the cause."""


def resolve_url(value: str | Path | URL | None, root: Path | None = None) -> URL:
    """The log's URL: a SQLAlchemy URL, or a plain path (a SQLite file); relative SQLite paths are taken
    from `root` (the project root); `postgresql://` uses psycopg (3)."""
    if isinstance(value, URL):
        url = value
    else:
        text = str(value or DEFAULT_URL).strip()
        url = make_url(text if "://" in text else f"sqlite:///{text}")
    if url.get_backend_name() == "sqlite":
        db = url.database or ""
        if not db or db == ":memory:" or db.startswith("file:"):
            raise ValueError(f"inference log {masked(url)}: give a SQLite file path (sqlite:///logs/inference.sqlite)")
        path = Path(db)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        return url.set(drivername="sqlite", database=str(path))
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"inference log {masked(url)}: expected sqlite:///<file> or postgresql+psycopg://...")
    return url


def masked(url: str | URL) -> str:
    """The URL as it may be printed: the password replaced by ***."""
    try:
        return (url if isinstance(url, URL) else make_url(str(url))).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: a path, which holds no secret
        return str(url)


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def sqlite_path(url: URL) -> Path | None:
    return Path(url.database) if is_sqlite(url) else None


def describe(url: URL) -> str:
    """How a message names the log: the file for SQLite, the masked URL otherwise."""
    return str(sqlite_path(url)) if is_sqlite(url) else masked(url)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL keeps it consistent
    cur.close()


def engine(url: URL, readonly: bool = False) -> Engine:
    """One engine per URL, mode and process. Read-only SQLite engines open the file with mode=ro (a reader
    never creates or writes it); PostgreSQL readers are plain MVCC readers (they never block the writers)."""
    key = (url.render_as_string(hide_password=False), readonly, os.getpid())
    with _ENGINES_LOCK:
        if key in _ENGINES:
            return _ENGINES[key]
        if is_sqlite(url):
            if readonly:
                eng = sa.create_engine(
                    f"sqlite:///file:{url.database}?mode=ro&uri=true",
                    connect_args={"timeout": 10.0, "check_same_thread": False},
                    poolclass=sa.pool.NullPool,
                )
            else:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
                # Connections are kept: opening one per batch (NullPool) took ~10% of a served worker's
                # samples under load (connect, pragmas, and a WAL checkpoint at every close). SQLite
                # checkpoints on its own every 1,000 pages; a broken connection is replaced (pre-ping).
                eng = sa.create_engine(url, connect_args={"timeout": 10.0, "check_same_thread": False},
                                       poolclass=sa.pool.QueuePool, pool_size=2, max_overflow=4,
                                       pool_pre_ping=True)  # fmt: skip
                sa.event.listen(eng, "connect", _sqlite_pragmas)
        else:
            eng = sa.create_engine(
                url,
                pool_pre_ping=True,  # a server restarted under us: reconnect, not fail the next batch
                pool_size=2,
                max_overflow=2,
                connect_args={"connect_timeout": 5, "application_name": "mmfusion"},
            )
        _ENGINES[key] = eng
        return eng


def dispose(url: URL) -> None:
    """Close every pooled connection of this process to `url` (after a server restart, at shutdown)."""
    with _ENGINES_LOCK:
        for key in [k for k in _ENGINES if k[0] == url.render_as_string(hide_password=False)]:
            _ENGINES.pop(key).dispose()


def exists(url: URL) -> bool:
    """Whether a log is there to read: the SQLite file, or the predictions table on the server."""
    if is_sqlite(url):
        return Path(url.database).exists()
    return has_table(url, "predictions")


def has_table(url_or_conn: URL | Connection, name: str) -> bool:
    if isinstance(url_or_conn, Connection):
        return sa.inspect(url_or_conn).has_table(name)
    with reading(url_or_conn) as conn:
        return sa.inspect(conn).has_table(name)


def columns(conn: Connection, table: str = "predictions") -> set[str]:
    return {c["name"] for c in sa.inspect(conn).get_columns(table)}


def first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unreachable(url: URL, exc: BaseException) -> LogUnavailable:
    """The one line for a log that cannot be reached: its (masked) URL, the cause, and what to do."""
    return LogUnavailable(
        f"inference log {describe(url)}: cannot connect ({first_line(exc)}); start its server or set "
        f"package.log.url / {URL_ENV}"
    )


@contextmanager
def reading(url: URL) -> Iterator[Connection]:
    """A read-only connection; LogUnavailable with one line when the log cannot be reached."""
    try:
        conn = engine(url, readonly=True).connect()
    except sa.exc.OperationalError as exc:
        raise unreachable(url, exc) from exc
    try:
        yield conn
    finally:
        conn.close()


def check_reachable(url: URL) -> None:
    """Raise LogUnavailable (one line) unless the log's server answers; a SQLite file always does."""
    if is_sqlite(url):
        return
    try:
        with engine(url).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        raise unreachable(url, exc) from exc


@contextmanager
def _migration_lock(url: URL, conn: Connection) -> Iterator[None]:
    """Several workers and replicas start at once: one migrates, the others wait and find it done."""
    if is_sqlite(url):
        import fasteners

        with fasteners.InterProcessLock(f"{url.database}.migrate.lock"):
            yield
    else:
        conn.execute(sa.text("SELECT pg_advisory_lock(hashtext('mmfusion_log_migrate'))"))
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext('mmfusion_log_migrate'))"))
            conn.commit()


def alembic_config(conn: Connection | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("version_table", VERSION_TABLE)
    cfg.attributes["connection"] = conn
    return cfg


@lru_cache(maxsize=1)
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(url: URL) -> str:
    """Create or migrate the log's schema to the newest revision (Alembic), once per process; the revision."""
    key = url.render_as_string(hide_password=False)
    if key in _UPGRADED:
        return _UPGRADED[key]
    from alembic import command

    try:
        with engine(url).connect() as conn:
            with _migration_lock(url, conn):
                if current_revision(conn) != head_revision():
                    command.upgrade(alembic_config(conn), "head")
                    conn.commit()
                _UPGRADED[key] = current_revision(conn)
    except sa.exc.OperationalError as exc:
        raise unreachable(url, exc) from exc
    return _UPGRADED[key]


def coerce(value: Any, kind: str) -> Any:
    """A log field's value as its column's type (a value that is not one becomes NULL, never a failed batch)."""
    if value is None:
        return None
    try:
        if kind == "float":
            v = float(value)
            return v if math.isfinite(v) else None
        if kind == "int":
            return int(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        return None


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m mmfusion.logdb`: which log, and its schema revision."""
    from mmfusion.config import load_params

    ap = argparse.ArgumentParser(prog="python -m mmfusion.logdb", description=main.__doc__)
    ap.add_argument("action", choices=["url", "current", "upgrade"],
                    help="url: the log's URL (password masked); current: its schema revision; upgrade: migrate it to the newest")  # fmt: skip
    ap.add_argument("--url", default=None, help=f"the log (default: ${URL_ENV}, else package.log.url in params.yaml)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    root = Path.cwd()
    url = resolve_url(args.url or os.environ.get(URL_ENV) or load_params(root / "params.yaml").package.log.url, root)
    try:
        if args.action == "url":
            print(masked(url))
        elif args.action == "current":
            with reading(url) as conn:
                print(f"{masked(url)}: revision {current_revision(conn) or 'none'} (newest {head_revision()})")
        else:
            print(f"{masked(url)}: revision {upgrade(url)}")
    except LogUnavailable as exc:
        print(exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
