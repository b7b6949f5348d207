"""Several worker processes serving one listening socket (``xig serve --workers N``).

The parent binds the socket once (:func:`gateway.web.server.bind`), applies the database migrations
once, then starts N workers with the ``spawn`` method (fresh interpreters: no engine, connection pool,
thread or event loop is shared across a fork). Each worker assembles its own responding gateway
(database engine, PACS backends), serves the inherited socket with uvicorn, and reports on a pipe when
it is listening; the kernel hands each new connection to one of them. Everything a later request may
depend on — issued KOS manifests and their deliveries, on-demand entries, patient links, jobs — is in
the shared database, so any worker answers like any other.

The parent only supervises: a worker that dies is replaced (a replacement that dies before listening
stops the gateway), and SIGINT/SIGTERM stop every worker gracefully (``[server] shutdown_timeout``),
killing the ones that overrun it. Waiting uses the workers' process sentinels, their pipes and a
self-pipe for signals — no polling.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import cast

from gateway.config import Config
from gateway.errors import XigError
from gateway.web import loop as event_loop
from gateway.web.server import ABORT_GRACE, bind

log = logging.getLogger("xig.workers")



class WorkerError(XigError):
    """The worker processes could not be started or kept running (the message says why)."""


def _shared_database(url: str) -> bool:
    """False for an in-memory SQLite database: each worker would get its own, empty one."""
    if not url.startswith("sqlite"):
        return True
    rest = url.split("://", 1)[1] if "://" in url else ""
    return rest not in ("", "/", "/:memory:") and "mode=memory" not in rest


# -------------------------------------------------------------------------------------------------
# In each worker (a spawned interpreter)
# -------------------------------------------------------------------------------------------------

def _worker_main(config: Config, sock: socket.socket, ready: Connection, lifeline: Connection,
                 log_level: str) -> None:
    """Entry point of one worker process: a :class:`~gateway.web.server.GatewayServer` (what ``serve`` runs)
    on the inherited socket.

    ``lifeline`` is the read end of a pipe only the parent writes to: it reads end-of-file when the parent
    is gone (even killed), and the worker then stops like on SIGTERM instead of serving on unsupervised.
    """
    from gateway.logs import WORKER_TEXT_FORMAT, configure_logging
    from gateway.soap.schema import default_schemas
    from gateway.web.server import GatewayServer

    configure_logging(config.observability.json_logs, log_level.upper(), text_format=WORKER_TEXT_FORMAT)
    default_schemas().warm()

    def started(event: str) -> None:
        if event == "started":  # listening: tell the parent (our pid), once
            ready.send(os.getpid())
            ready.close()

    gateway = GatewayServer(config, log_level=log_level, lifecycle_observers=[started])

    def watch_parent() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv()
        if not gateway.server.should_exit:
            logging.getLogger("xig.workers").warning("the supervising process is gone: stopping")
            gateway.request_stop()

    threading.Thread(target=watch_parent, name="xig-lifeline", daemon=True).start()
    with gateway.server.capture_signals():  # graceful shutdown on SIGINT/SIGTERM, after which the services close
        event_loop.run(gateway.serve(sockets=[sock]), config.server.event_loop)


# -------------------------------------------------------------------------------------------------
# In the parent
# -------------------------------------------------------------------------------------------------

class WorkerPool:
    """N worker processes serving one socket bound here; :meth:`start` returns once all of them listen.

    Usable as a context manager (tests, benchmarks); :func:`serve_workers` runs one in the foreground.
    """

    def __init__(self, config: Config, workers: int, *, log_level: str = "warning",
                 start_timeout: float = 120.0) -> None:
        if workers < 1:
            raise WorkerError(f"--workers must be at least 1, not {workers}")
        if workers > 1 and not _shared_database(config.database.url):
            raise WorkerError(f"database.url {config.database.url!r} is an in-memory SQLite database, which worker "
                              "processes cannot share; use a SQLite file or PostgreSQL")
        self.config = config
        self.workers = workers
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._mp = multiprocessing.get_context("spawn")
        self.socket: socket.socket | None = None
        self.processes: list[BaseProcess] = []
        self._lifelines: dict[BaseProcess, Connection] = {}  # our write ends (see _worker_main)
        self.stopping = False

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self.socket is None:
            raise WorkerError("the worker pool is not started")
        return int(self.socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.server.host
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> WorkerPool:
        from gateway.store.db import open_database

        # migrations once, here, before any worker opens the database (they are safe concurrently too)
        open_database(self.config.database.url, self.config.base_dir).dispose()
        self.socket = bind(self.config.server.host, self.config.server.port)
        try:
            self._spawn(self.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, count: int) -> None:
        """Start ``count`` workers and wait until each listens (or fail with the reason)."""
        assert self.socket is not None
        pending: dict[Connection, BaseProcess] = {}
        for _ in range(count):
            reader, writer = self._mp.Pipe(duplex=False)
            lifeline_r, lifeline_w = self._mp.Pipe(duplex=False)
            proc = self._mp.Process(target=_worker_main, name="xig-worker", daemon=False,
                                    args=(self.config, self.socket, writer, lifeline_r, self.log_level))
            proc.start()
            writer.close()  # the child's ends: ours would keep the pipes open after the child's exit
            lifeline_r.close()
            self._lifelines[proc] = lifeline_w
            self.processes.append(proc)
            pending[reader] = proc
        deadline = time.monotonic() + self.start_timeout
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerError(f"{len(pending)} worker(s) did not start listening within "
                                      f"{self.start_timeout:g} s")
                for ready in wait(list(pending), timeout=remaining):
                    reader = cast(Connection, ready)
                    starting = pending.pop(reader)
                    try:
                        reader.recv()  # the worker's pid: it listens
                    except EOFError:  # closed without a word: start-up failed (its log says why)
                        starting.join(10)
                        raise WorkerError(f"worker {starting.pid} exited during start-up (exit code "
                                          f"{starting.exitcode}); "
                                          "see its log above") from None
                    finally:
                        reader.close()
        finally:
            for reader in pending:
                reader.close()

    def sentinels(self) -> list[int]:
        return [p.sentinel for p in self.processes]

    def replace_dead(self) -> list[tuple[int | None, int | None]]:
        """Start a new worker for each one that exited; returns the (pid, exit code) of the dead ones."""
        dead = [p for p in self.processes if not p.is_alive()]
        if not dead or self.stopping:
            return []
        for p in dead:
            p.join()
            self.processes.remove(p)
            self._lifelines.pop(p).close()
            log.error("worker %s exited unexpectedly (exit code %s); starting a replacement", p.pid, p.exitcode)
        self._spawn(len(dead))
        return [(p.pid, p.exitcode) for p in dead]

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown of every worker (SIGTERM), killing those still running after ``timeout``."""
        self.stopping = True
        # as BackgroundServer.stop: the shutdown timeout, then the abort graces of a graceful stop
        grace = timeout if timeout is not None else float(self.config.server.shutdown_timeout) + 4 * ABORT_GRACE
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + grace
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                log.warning("worker %s did not stop within %g s; killing it", p.pid, grace)
                p.kill()
                p.join(10)
        for p in self.processes:
            self._lifelines.pop(p).close()
            with contextlib.suppress(ValueError):  # one that even SIGKILL did not end within 10 s
                p.close()
        self.processes = []
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_workers(config: Config, workers: int, *, log_level: str = "info",
                  on_ready: Callable[[WorkerPool], None] | None = None,
                  on_replaced: Callable[[WorkerPool, list[tuple[int | None, int | None]]], None] | None = None) -> None:
    """Serve with ``workers`` processes in the foreground until SIGINT/SIGTERM (main thread only).

    ``on_ready(pool)`` runs once every worker listens; ``on_replaced(pool, [(pid, exit code), ...])`` once
    the replacements of workers that died listen. Raises :class:`WorkerError` when the workers cannot be
    started or a replacement fails to start.
    """
    caught: list[int] = []
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(wake_w.fileno())  # a signal wakes the wait below
    pool = WorkerPool(config, workers, log_level=log_level)
    try:
        pool.start()
        if on_ready is not None:
            on_ready(pool)
        while not caught:
            wait([wake_r, *pool.sentinels()])
            if caught:
                break
            try:
                while wake_r.recv(512):
                    pass
            except BlockingIOError:
                pass
            dead = pool.replace_dead()
            if dead and on_replaced is not None:
                on_replaced(pool, dead)
        log.info("stopping %d worker(s) (signal %s)", len(pool.processes), caught[0] if caught else "-")
    finally:
        pool.stop()
        signal.set_wakeup_fd(previous_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        wake_r.close()
        wake_w.close()
