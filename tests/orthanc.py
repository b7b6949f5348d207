"""A real Orthanc for integration tests (``/usr/sbin/Orthanc`` + the DICOMweb plugin).

:class:`OrthancServer` writes a JSON configuration into a temporary folder, starts Orthanc bound to
loopback on free ports (HTTP and DICOM), waits until ``/system`` answers, and stops it again
(terminate, wait, kill as last resort; also registered with :mod:`atexit`, so no process outlives
the test run). The configuration:

* ``RemoteAccessAllowed: false``, ``AuthenticationEnabled: false``: loopback only, no users.
* ``Plugins``: the DICOMweb plugin only (QIDO-RS / WADO-RS / STOW-RS under ``/dicom-web/``).
* ``DicomModalities``: one entry per AE title we use (``"XIG"`` by default) in the Orthanc 1.10
  object form with ``AllowEcho/Find/Get/Move/Store`` true, so C-MOVE knows where ``XIG`` listens
  (:attr:`OrthancServer.move_port`, a free port our C-MOVE storage SCP binds); plus
  ``DicomAlwaysAllow{Echo,Find,Get,Move,Store}`` so unknown calling AEs work too, and
  ``DicomCheckCalledAet``/``DicomCheckModalityHost`` off.
* ``StableAge: 1``, ``LimitFindResults``/``LimitFindInstances: 0`` (no truncated C-FIND/QIDO answers),
  ``DicomAssociationCloseDelay: 0`` (C-MOVE sub-associations close at once), ``StorageCompression``
  and ``HttpCompressionEnabled`` off (byte-exact storage, no gzip on WADO), ``SaveJobs`` off.
* Orthanc 1.10 has no TCP_NODELAY option; DCMTK (which carries Orthanc's DICOM traffic) disables Nagle
  by default and honours the ``TCP_NODELAY`` environment variable, which we set to ``1``.

Tests sharing one server must not depend on each other's order: seed what you need (uploads are
idempotent: an instance already stored answers ``AlreadyStored``), use UIDs of your own, and do not
:meth:`~OrthancServer.reset` a shared server.

``orthanc_fixture()`` makes a pytest fixture (session scope by default) yielding a started server::

    # conftest.py
    from tests.orthanc import orthanc_fixture
    orthanc = orthanc_fixture()
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

ORTHANC_BINARY = Path(os.environ.get("XIG_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(os.environ.get("XIG_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_available() -> bool:
    return ORTHANC_BINARY.exists() and DICOMWEB_PLUGIN.exists()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Terminate (graceful shutdown), then kill if it does not exit within ``timeout``; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


class OrthancError(RuntimeError):
    pass


class OrthancServer:
    """One Orthanc process with its own storage, ports and configuration under ``workdir``."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC", modalities: Iterable[str] = ("XIG",),
                 http_port: int | None = None, dicom_port: int | None = None,
                 extra_config: Mapping[str, Any] | None = None, startup_attempts: int = 150) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        #: AE title → port where that AE (our storage SCP) listens for C-MOVE sub-operations
        self.modality_ports: dict[str, int] = {name: free_port() for name in modalities}
        self.extra_config = dict(extra_config or {})
        self.startup_attempts = startup_attempts
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._client: httpx.Client | None = None

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def move_port(self) -> int:
        """Port of the first modality (``XIG``): where a C-MOVE to that AE title is sent."""
        return next(iter(self.modality_ports.values()))

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- configuration -----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        modalities = {
            name: {"AET": name, "Host": "127.0.0.1", "Port": port, "AllowEcho": True, "AllowFind": True,
                   "AllowGet": True, "AllowMove": True, "AllowStore": True, "AllowTranscoding": True}
            for name, port in self.modality_ports.items()
        }
        cfg: dict[str, Any] = {
            "Name": f"xig-test-{self.dicom_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 16,
            "HttpCompressionEnabled": False,
            "HttpRequestTimeout": 60,
            "KeepAlive": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomModalities": modalities,
            "DicomModalitiesInDatabase": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowStore": True,
            "DicomThreadsCount": 8,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 15,
            "DicomAssociationCloseDelay": 0,
            "UnknownSopClassAccepted": False,
            "StableAge": 1,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "OverwriteInstances": False,
            "ExecuteLuaEnabled": False,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": False,
                "Ssl": False,
                "StudiesMetadata": "MainDicomTags",
                "SeriesMetadata": "Full",
            },
        }
        cfg.update(self.extra_config)
        return cfg

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> OrthancServer:
        if not orthanc_available():
            raise OrthancError(f"Orthanc not installed ({ORTHANC_BINARY}, {DICOMWEB_PLUGIN})")
        if self.process is not None:
            raise OrthancError("already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        self._log = self.log_path.open("ab")
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.process = subprocess.Popen([str(ORTHANC_BINARY), str(cfg_path)], cwd=self.workdir,
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll ``/system`` (and the DICOM port) until both answer; each attempt waits ≤ 0.1 s on the process."""
        assert self.process is not None
        last = "no answer"
        for _ in range(self.startup_attempts):
            try:
                rsp = httpx.get(f"{self.url}/system", timeout=0.5)
                if rsp.status_code == 200:
                    with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                        return
                last = f"HTTP {rsp.status_code}"
            except (httpx.HTTPError, OSError) as exc:
                last = str(exc) or type(exc).__name__
            # waits on the process itself: returns early (and we fail) when Orthanc exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(timeout=0.1)
                raise OrthancError(f"Orthanc exited with status {code} during start-up:\n{self.log_tail()}")
        raise OrthancError(f"Orthanc did not become ready ({last}):\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Kill Orthanc at once (SIGKILL), like a crashed PACS; a graceful :meth:`stop` takes ~3 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)
        self.stop()

    def stop(self) -> None:
        """Terminate Orthanc and wait for it (kill after 15 s); idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def __enter__(self) -> OrthancServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def remove(self) -> None:
        """Stop and delete the working folder."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- REST helpers ------------------------------------------------------------------------------
    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=60)
        return self._client

    def upload(self, paths: Iterable[Path]) -> list[str]:
        """POST each Part 10 file to ``/instances``; return the Orthanc instance IDs (new or already stored)."""
        ids: list[str] = []
        for path in paths:
            rsp = self.client.post("/instances", content=Path(path).read_bytes(),
                                   headers={"Content-Type": "application/dicom"})
            if rsp.status_code != 200:
                raise OrthancError(f"upload of {path} failed: HTTP {rsp.status_code} {rsp.text[:200]}")
            body = rsp.json()
            ids.append(body["ID"])
        return ids

    def get_json(self, path: str) -> Any:
        rsp = self.client.get(path)
        rsp.raise_for_status()
        return rsp.json()

    def instance_count(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])

    def delete_study(self, study_instance_uid: str) -> None:
        rsp = self.client.post("/tools/lookup", content=study_instance_uid)
        rsp.raise_for_status()
        for hit in rsp.json():
            if hit.get("Type") == "Study":
                self.client.delete(f"/studies/{hit['ID']}").raise_for_status()

    def reset(self) -> None:
        """Delete every patient (and so everything) stored."""
        for pid in self.get_json("/patients"):
            self.client.delete(f"/patients/{pid}").raise_for_status()

    def set_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        """Add or change a DICOM modality at run time (REST ``PUT /modalities/{name}``)."""
        self.modality_ports[name] = port
        body = {"AET": aet, "Host": host, "Port": port, "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                "AllowMove": True, "AllowStore": True}
        self.client.put(f"/modalities/{name}", json=body).raise_for_status()


def orthanc_fixture(scope: str = "session", **kwargs: Any) -> Callable[..., Iterator[OrthancServer]]:
    """A pytest fixture yielding a started :class:`OrthancServer` (fails clearly when Orthanc is missing:
    ``make test`` installs it, and CI must run every test).

    ``kwargs`` go to :class:`OrthancServer` (e.g. ``modalities=("XIG", "XIG2")``).
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload, untyped-decorator]
    def _orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
        assert orthanc_available(), f"Orthanc is not installed ({ORTHANC_BINARY}); run `make install` as root"
        server = OrthancServer(tmp_path_factory.mktemp("orthanc"), **kwargs)
        server.start()
        try:
            yield server
        finally:
            server.stop()

    return _orthanc  # type: ignore[no-any-return]
