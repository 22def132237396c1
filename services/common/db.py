"""SQLAlchemy 2 engine and session handling, and Alembic migrations per service.

SQLite is the embedded default (WAL, foreign keys on, a busy timeout so concurrent writers
wait instead of failing); PostgreSQL is production. Domain code is synchronous and runs in a
worker thread (asyncio.to_thread) from the async servicers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, Table, create_engine, event


def _wal(cur) -> None:  # noqa: ANN001 - a DBAPI cursor
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode


def sqlite_wal(engine: Engine) -> None:
    """WAL with synchronous=NORMAL, as this module's own engines, for an SQLite engine another
    library made (MLflow's tracking store, Optuna's storage): a commit costs no fsync. Connections
    opened from now on get the settings."""
    def pragmas(conn, _record) -> None:  # noqa: ANN001 - DBAPI types
        cur = conn.cursor()
        _wal(cur)
        cur.close()
    event.listen(engine, "connect", pragmas)
    engine.dispose()  # the pool's connections were opened before the listener


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # noqa: ANN001 - DBAPI types
            cur = conn.cursor()
            _wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            conn.isolation_level = None  # the "begin" hook below issues BEGIN itself

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # noqa: ANN001
            # Writers take the write lock at BEGIN: avoids SQLite's deadlock-prone lock upgrade when
            # two transactions read then write ("database is locked"). Readers must not take it.
            readonly = conn.get_execution_options().get("strata_readonly", False)
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._read_engine = self.engine.execution_options(strata_readonly=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # Core connections, not ORM sessions: the services use SQL expressions only, and a Session
    # costs about a third more per query.
    @contextmanager
    def session(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back on any exception."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A transaction that only reads (on SQLite it does not take the write lock)."""
        with self._read_engine.begin() as conn:
            yield conn

    def upsert(self, conn: Connection, table: Table, rows: list[dict], keys: list[str]) -> None:
        """Insert `rows`, replacing the non-key columns of rows whose `keys` exist: one
        executemany (INSERT .. ON CONFLICT DO UPDATE, on SQLite and PostgreSQL alike)."""
        if not rows:
            return
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        stmt = dialect_insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_={
            c: stmt.excluded[c] for c in rows[0] if c not in keys})
        conn.execute(stmt, rows)

    def migrate(self, migrations_dir: Path) -> None:
        """Bring the schema to the newest revision (Alembic `upgrade head`)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir))
        cfg.attributes["connection_url"] = self.url
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def dispose(self) -> None:
        self.engine.dispose()
