"""A real PostgreSQL for tests (the Debian ``postgresql`` server binaries, ``initdb`` + ``pg_ctl``).

:class:`PostgresServer` creates a cluster in a fresh temporary folder, listens on loopback only
(``127.0.0.1`` on a free port, its unix socket in that folder), with password (SCRAM) authentication
for the superuser ``xig`` and durability switched off (``fsync``, ``synchronous_commit``,
``full_page_writes``: a test cluster is thrown away). ``pg_ctl -w`` returns once the server accepts
connections (no sleeps); :meth:`PostgresServer.stop` is a fast shutdown, also registered with
:mod:`atexit` so no server outlives the test run.

``initdb`` and ``postgres`` refuse to run as root: when the tests run as root, every server command
runs as the unprivileged ``postgres`` user (``XIG_PG_USER`` to choose another) through ``runuser``,
and the cluster folder is handed to that user; as a normal user they run directly.

Each test gets its own database (``CREATE DATABASE``) from the ``pg_url`` fixture, dropped afterwards.
Use the fixtures in a test module (or register them once in conftest.py) with::

    pytest_plugins = ["tests.postgres"]
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.orthanc import free_port


def _bin_dir() -> Path:
    if os.environ.get("XIG_PG_BIN"):
        return Path(os.environ["XIG_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _bin_dir()
SUPERUSER = "xig"
PASSWORD = "xig-test-only"


def postgres_available() -> bool:
    return (PG_BIN / "initdb").exists() and (PG_BIN / "pg_ctl").exists()


class PostgresError(RuntimeError):
    pass


class PostgresServer:
    """One PostgreSQL cluster under a fresh temporary folder, on ``127.0.0.1:port``."""

    def __init__(self, *, user: str | None = None) -> None:
        self.run_as = user if user is not None else (os.environ.get("XIG_PG_USER", "postgres")
                                                     if os.geteuid() == 0 else "")
        self.port = 0
        self.workdir: Path | None = None
        self.started = False

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "data"

    def url(self, database: str = "postgres", driver: str = "postgresql") -> str:
        """SQLAlchemy URL of ``database`` (``postgresql://`` is what an operator writes in xig.toml)."""
        return f"{driver}://{SUPERUSER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines: int = 40) -> str:
        if self.workdir is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / "postgres.log").read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- running the server's own commands ---------------------------------------------------------
    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              cwd=self.workdir, env={**os.environ, "LC_ALL": "C"})
        if proc.returncode != 0:
            raise PostgresError(f"{args[0]} exited with {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
                                f"\n{self.log_tail()}")
        return proc

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, attempts: int = 3) -> PostgresServer:
        if not postgres_available():
            raise PostgresError(f"PostgreSQL server binaries not found in {PG_BIN}; run `make install` as root")
        if self.started:
            raise PostgresError("already started")
        self.workdir = Path(tempfile.mkdtemp(prefix="xig-pg-"))
        atexit.register(self.stop)
        try:
            if self.run_as:
                entry = pwd.getpwnam(self.run_as)
                os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
            pwfile = self.workdir / "pwfile"
            pwfile.write_text(PASSWORD + "\n")
            if self.run_as:
                os.chown(pwfile, pwd.getpwnam(self.run_as).pw_uid, -1)
            pwfile.chmod(0o600)
            self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-instructions")
            pwfile.unlink()
            for attempt in range(attempts):  # another process may take the free port before the server binds it
                self.port = free_port()
                options = " ".join([
                    "-c listen_addresses=127.0.0.1", f"-p {self.port}", f"-c unix_socket_directories={self.workdir}",
                    "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
                    "-c max_connections=200", "-c shared_buffers=32MB"])
                try:
                    self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.workdir / "postgres.log"),
                              "-w", "-t", "60", "-o", options, "start")
                    break
                except PostgresError:
                    if attempt == attempts - 1:
                        raise
            self.started = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Fast shutdown (open sessions are ended), then the cluster folder is removed; idempotent."""
        workdir = self.workdir
        if workdir is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                with contextlib.suppress(PostgresError, subprocess.TimeoutExpired):
                    self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop")
        finally:
            self.started = False
            self.workdir = None
            shutil.rmtree(workdir, ignore_errors=True)
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)

    # -- databases ---------------------------------------------------------------------------------
    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, password=PASSWORD,
                               dbname="postgres", autocommit=True)

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its SQLAlchemy URL (``postgresql://…``)."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name: ours, [a-z0-9_]
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_shared: PostgresServer | None = None


def shared_server() -> PostgresServer:
    """One server per test process, whichever module asks first (stopped at exit)."""
    global _shared
    if _shared is None or not _shared.started:
        _shared = PostgresServer().start()
    return _shared


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A started PostgreSQL (fails clearly when it is missing: ``make install`` installs it)."""
    assert postgres_available(), f"PostgreSQL is not installed ({PG_BIN}); run `make install` as root"
    server = shared_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test: its URL (``postgresql://xig:…@127.0.0.1:port/t_…``)."""
    url = postgres.create_database()
    try:
        yield url
    finally:
        postgres.drop_database(url)
