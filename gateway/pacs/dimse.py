"""DIMSE adapter (pynetdicom): C-ECHO, C-FIND, C-GET or C-MOVE, C-STORE.

* ``ping`` — C-ECHO (Verification).
* ``find_patients`` — Patient Root C-FIND at PATIENT level (Study Root STUDY level when the PACS
  does not offer Patient Root): ``PatientName = FAMILY*`` (asked as given, upper case and capitalised,
  since PN matching is case sensitive on some PACS), ``PatientBirthDate = from-to``, and one query per
  requested Patient ID. Results are the union (the service scores them; over-returning is fine).
* ``find_studies`` / ``get_study`` — Study Root C-FIND, STUDY → SERIES → IMAGE, over one association.
* ``retrieve`` — first a C-FIND at IMAGE level with the requested SOP Instance UIDs (UID list
  matching), which tells which instances exist and their SOP classes; unknown instances become
  :class:`RetrieveFailure` at once (one unknown UID in a C-GET/C-MOVE list fails the whole request on
  Orthanc). Then IMAGE-level C-GET (default) or C-MOVE per series with the UID list:

  - C-GET negotiates, for every SOP class found, one presentation context per transfer syntax with
    the SCP role (PS3.7 D.3.3.4), so the PACS can send each instance in its stored syntax;
  - C-MOVE asks the PACS to send to our AE title (``move_destination``, default the calling AE) and
    runs a Storage SCP on ``move_port`` in this process (started on first use, shared by concurrent
    retrieves and by backends using the same port; sub-operations are routed by SOP Instance UID).
    The PACS must know that AE title and port.

  Each received C-STORE data set is delivered as a :class:`RetrievedInstance` whose chunks are the
  Part 10 encoding — preamble, File Meta (transfer syntax = the presentation context's), and the data
  set bytes exactly as received (never decoded). pynetdicom is threaded; a worker thread runs the
  associations and hands instances to the event loop through an anyio memory object stream of
  ``queue_size`` items, so at most ``queue_size + 2`` instances are in memory and a slow consumer
  slows the PACS down (TCP back-pressure) instead of filling memory. A consumer stalling longer than
  ``dimse_timeout`` (or the PACS's own association timeout) makes the association time out.

Failures: no association (refused, rejected, aborted, timeout) → :class:`PacsError` from the query
methods. ``retrieve`` never raises between items: instances that could not be delivered — unknown,
failed sub-operations, or the PACS gone mid-way — come out as :class:`RetrieveFailure` with the reason.
``TCP_NODELAY`` is set on every association socket (Nagle's algorithm stalls C-GET sub-operations).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Literal, cast

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from gateway.dicom import values as dv
from gateway.pacs.base import (
    InstanceInfo,
    InstanceRef,
    PacsError,
    PatientQuery,
    PatientRecord,
    RetrievedInstance,
    RetrieveFailure,
    SeriesInfo,
    StoreResult,
    StudyInfo,
)
from gateway.pacs.filesystem import accession_issuer

__all__ = ["RETRIEVE_TRANSFER_SYNTAXES", "DimseBackend"]

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
#: Transfer syntaxes offered (one presentation context each) per SOP class for C-GET.
RETRIEVE_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless,
    JPEG2000, RLELossless,
)
_MAX_CONTEXTS = 127  # 128 presentation contexts per association (odd IDs 1..255), one for the Q/R model
#: UIDs per C-FIND / C-GET / C-MOVE identifier (a UI value must stay below 64 KiB in explicit VR)
_UID_BATCH = 500
_PENDING = (0xFF00, 0xFF01)
_STORE_OK = 0x0000
_STORE_REFUSED = 0xA700  # Refused: Out of Resources (our consumer went away)
_STORE_UNEXPECTED = 0xC000  # Error: Cannot understand (no retrieve waits for this instance)

Item = RetrievedInstance | RetrieveFailure


# -------------------------------------------------------------------------------------------------
# Small helpers
# -------------------------------------------------------------------------------------------------

#: seconds to wait for an association's reactor thread to park before a request (it parks within ~1 ms)
_PARK_TIMEOUT = 5.0


class _ReactorCheckpoint:
    """pynetdicom's reactor checkpoint (a :class:`threading.Event` it calls ``set``/``clear``/``wait`` on) that
    can also say when the reactor thread is parked in ``wait``.

    Each association runs a reactor thread that takes any DIMSE message it finds in the association's
    queue and serves it as a *request*; a response it takes is dropped ("Received unexpected C-FIND service
    message", pydicom/pynetdicom#875). Before sending a request, pynetdicom pauses the reactor with
    ``clear()`` and then polls a flag the reactor sets *before* it calls ``wait()`` — so a reactor that has
    just returned from ``wait()`` looks paused, runs one more round and can take the first response of the
    request: one C-FIND match lost, an instance reported missing from the PACS (seen under load, in a test
    of two concurrent retrieves). :meth:`park` returns only once the reactor waits on a cleared
    checkpoint; requests made after it cannot lose a response.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._flag = True
        self._parked = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            while not self._flag:
                self._parked = True
                self._cond.notify_all()
                if not self._cond.wait(timeout):
                    break
            self._parked = False
            return self._flag

    def park(self, timeout: float) -> bool:
        """Clear the checkpoint and wait until the reactor is parked on it. ``False`` when it did not park
        within ``timeout`` seconds, or the checkpoint was set meanwhile (pynetdicom sets it to let the
        reactor of an aborted association end)."""
        with self._cond:
            self._flag = False
            self._cond.wait_for(lambda: self._parked or self._flag, timeout)
            return self._parked


def _install_checkpoint(assoc: Association) -> None:
    """Give a just-established association a :class:`_ReactorCheckpoint` (its own one is set: the reactor
    picks the new one up on its next round)."""
    assoc._reactor_checkpoint = _ReactorCheckpoint()  # type: ignore[assignment]


def _park_reactor(assoc: Association) -> None:
    """Before a request on ``assoc`` (C-ECHO/FIND/GET/MOVE/STORE or A-RELEASE): see :class:`_ReactorCheckpoint`."""
    checkpoint = assoc._reactor_checkpoint
    if isinstance(checkpoint, _ReactorCheckpoint) and not checkpoint.park(_PARK_TIMEOUT):
        log.debug("DIMSE association reactor did not park within %s s", _PARK_TIMEOUT)


def quiet_pynetdicom() -> None:
    """pynetdicom's message-by-message logging only when its logger is at DEBUG (``xig serve --verbose``).

    By default pynetdicom logs every DIMSE message at INFO and pretty-prints every C-FIND identifier
    *before* the logging level is consulted, and runs a logging handler for every PDU: ~10,000 log
    lines for one RAD-75 of 400 instances over C-GET, about a tenth of the gateway's CPU on it, and
    operators' logs drowned. XIG logs its own outcome of each PACS operation; pynetdicom's warnings and
    errors still pass (:func:`gateway.logs.configure_logging` keeps its logger at WARNING).
    """
    verbose = logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
    _config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"
    _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = verbose


def _set_nodelay(event: evt.Event) -> None:
    with contextlib.suppress(AttributeError, OSError):
        assoc_sock = event.assoc.dul.socket
        sock = assoc_sock.socket if assoc_sock is not None else None  # the association's TCP socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _status_text(status: Dataset) -> str:
    if "Status" not in status:
        return "no response (association aborted or timed out)"
    text = f"status 0x{int(status.Status):04X}"
    comment = dv.text(status, "ErrorComment")
    if comment:
        text += f" ({comment})"
    failed = status.get("NumberOfFailedSuboperations")
    if failed:
        text += f", {failed} failed sub-operation(s)"
    return text


def _family_variants(family: str) -> list[str]:
    clean = "".join(c for c in family.strip() if c not in "*?\\^=")
    if not clean:
        return []
    return list(dict.fromkeys([clean, clean.upper(), clean.capitalize()]))


def _range(a: str | None, b: str | None) -> str:
    return f"{a or ''}-{b or ''}" if (a or b) else ""


def _part10_header(event: evt.Event) -> bytes:
    """Preamble + ``DICM`` + File Meta for a received C-STORE data set (transfer syntax = the context's)."""
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_file_meta_info(buf, event.file_meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue()


async def _chunked(header: bytes, body: bytes) -> AsyncIterator[bytes]:
    yield header
    view = memoryview(body)
    for start in range(0, len(body), CHUNK_SIZE):
        yield bytes(view[start:start + CHUNK_SIZE])


# -------------------------------------------------------------------------------------------------
# Thread → event loop bridge
# -------------------------------------------------------------------------------------------------

class _Channel:
    """Blocking ``put`` from any thread into an anyio memory object stream owned by an event loop."""

    def __init__(self, send: MemoryObjectSendStream[Item], token: anyio.lowlevel.EventLoopToken) -> None:
        self._send = send
        self._token = token
        self.cancelled = threading.Event()

    def put(self, item: Item) -> bool:
        """Block until the consumer has room; ``False`` when the consumer is gone."""
        if self.cancelled.is_set():
            return False
        try:
            anyio.from_thread.run(self._send.send, item, token=self._token)
            return True
        except BaseException:  # noqa: BLE001 - closed/broken stream or event loop gone: stop producing
            self.cancelled.set()
            return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            anyio.from_thread.run_sync(self._send.close, token=self._token)


@dataclass
class _Session:
    """One retrieve: which SOP instances it waits for, and where they go."""

    channel: _Channel
    waiting: dict[str, list[InstanceRef]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deliver(self, event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        sop = str(req.AffectedSOPInstanceUID)
        with self.lock:
            refs = self.waiting.pop(sop, None)
        if refs is None:
            return _STORE_UNEXPECTED
        header = _part10_header(event)
        body = cast(BytesIO, req.DataSet).getvalue()  # the data set as received, not decoded
        ts = str(event.context.transfer_syntax)
        sop_class = str(req.AffectedSOPClassUID)
        for ref in refs:
            item = RetrievedInstance(ref=ref, TransferSyntaxUID=ts, SOPClassUID=sop_class,
                                     chunks=_chunked(header, body), size=len(header) + len(body))
            if not self.channel.put(item):
                return _STORE_REFUSED
        return _STORE_OK

    def fail(self, sops: Sequence[str], reason: str, *, missing: bool = False) -> bool:
        """Report the still-waiting ones among ``sops`` as failures; ``False`` when the consumer is gone."""
        for sop in sops:
            with self.lock:
                refs = self.waiting.pop(sop, None)
            for ref in refs or ():
                if not self.channel.put(RetrieveFailure(ref, reason, missing)):
                    return False
        return True

    def fail_all(self, reason: str) -> None:
        with self.lock:
            sops = list(self.waiting)
        self.fail(sops, reason)


class _FindRefused(PacsError):
    """The PACS answered a C-FIND with a failure status (as opposed to not answering)."""


class _MoveReceiver:
    """The Storage SCP receiving C-MOVE sub-operations on one port, shared by every retrieve of the process.

    Retrieves register the SOP Instance UIDs they wait for; each incoming C-STORE is routed by its
    SOP Instance UID (the one thing every PACS sends). Acquired per backend, stopped with the last one.
    """

    _registry: dict[tuple[str, int], _MoveReceiver] = {}
    _registry_lock = threading.Lock()

    def __init__(self, ae_title: str, host: str, port: int, max_pdu: int) -> None:
        self.ae_title, self.host, self.port, self.max_pdu = ae_title, host, port, max_pdu
        self._lock = threading.Lock()
        self._routes: dict[str, _Session] = {}
        self._server: Any = None
        self._users = 0

    @classmethod
    def acquire(cls, ae_title: str, host: str, port: int, max_pdu: int) -> _MoveReceiver:
        with cls._registry_lock:
            receiver = cls._registry.get((host, port))
            if receiver is None:
                receiver = cls._registry[(host, port)] = _MoveReceiver(ae_title, host, port, max_pdu)
            receiver._users += 1
            return receiver

    def release(self) -> None:
        with self._registry_lock:
            self._users -= 1
            last = self._users <= 0
            if last and self._registry.get((self.host, self.port)) is self:
                del self._registry[(self.host, self.port)]
        if last:
            self.stop()

    def ensure_started(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            quiet_pynetdicom()
            ae = AE(ae_title=self.ae_title)
            ae.maximum_pdu_size = self.max_pdu
            for cx in AllStoragePresentationContexts:
                if cx.abstract_syntax:
                    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            try:
                self._server = ae.start_server((self.host, self.port), block=False,
                                               evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                             (evt.EVT_CONN_OPEN, _set_nodelay)])
            except OSError as exc:
                raise PacsError(f"cannot listen for C-MOVE on {self.host or '*'}:{self.port}: {exc}") from exc

    def register(self, session: _Session, sops: Sequence[str]) -> None:
        with self._lock:
            for sop in sops:
                self._routes[sop] = session

    def unregister(self, sops: Sequence[str], session: _Session) -> None:
        with self._lock:
            for sop in sops:
                if self._routes.get(sop) is session:
                    del self._routes[sop]

    def _on_store(self, event: evt.Event) -> int:
        sop = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        with self._lock:
            session = self._routes.get(sop)
        if session is None:
            log.warning("C-MOVE sub-operation for SOP instance %s that no retrieve is waiting for", sop)
            return _STORE_UNEXPECTED
        return session.deliver(event)

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()


# -------------------------------------------------------------------------------------------------
# The backend
# -------------------------------------------------------------------------------------------------

class DimseBackend:
    """A DICOM PACS reached over DIMSE (pynetdicom)."""

    def __init__(self, *, host: str, port: int, source_id: str, called_ae: str = "ORTHANC",
                 calling_ae: str = "XIG", retrieve: Literal["c-get", "c-move"] = "c-get",
                 move_port: int = 0, move_host: str = "", move_destination: str | None = None,
                 timeout: float = 30.0, dimse_timeout: float = 60.0, max_pdu: int = 1024 * 1024,
                 queue_size: int = 2, retrieve_ae_title: str | None = None, name: str | None = None) -> None:
        if retrieve not in ("c-get", "c-move"):
            raise ValueError(f"retrieve must be 'c-get' or 'c-move', not {retrieve!r}")
        self.host, self.port = host, port
        self.source_id = source_id
        self.called_ae, self.calling_ae = called_ae, calling_ae
        self.retrieve_method = retrieve
        self.move_port, self.move_host = move_port, move_host
        self.move_destination = move_destination or calling_ae
        self.timeout, self.dimse_timeout = timeout, dimse_timeout
        self.max_pdu = max_pdu
        self.queue_size = max(1, queue_size)
        self.retrieve_ae_title = retrieve_ae_title or called_ae
        self.name = name or f"dimse:{called_ae}@{host}:{port}"
        self._receiver: _MoveReceiver | None = None
        self._threads: set[threading.Thread] = set()
        self._active: set[tuple[_Channel, MemoryObjectReceiveStream[Item]]] = set()
        #: associations currently open (the ``xig_pacs_open_associations`` gauge reads it)
        self.open_associations = 0
        self._assoc_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DimseBackend({self.called_ae}@{self.host}:{self.port}, {self.retrieve_method}, " \
               f"source_id={self.source_id!r})"

    # -- associations ------------------------------------------------------------------------------
    @property
    def _peer(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"

    def _why_not(self, assoc: Association) -> str:
        if assoc.is_rejected:
            return "association rejected"
        if assoc.is_aborted:
            return "association aborted by the PACS"
        try:
            with socket.create_connection((self.host, self.port), timeout=min(self.timeout, 5.0)):
                return "association not established (no answer to A-ASSOCIATE)"
        except TimeoutError:
            return "connection timed out"
        except OSError as exc:
            return f"cannot connect ({exc.strerror or exc})"

    @contextlib.contextmanager
    def _association(self, contexts: Sequence[tuple[str, Sequence[str]]], *, roles: Sequence[str] = (),
                     handlers: Sequence[tuple[Any, Callable[..., Any]]] = ()) -> Iterator[Association]:
        quiet_pynetdicom()  # read when the association is created
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeout
        ae.connection_timeout = self.timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.dimse_timeout
        ae.maximum_pdu_size = self.max_pdu
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, list(syntaxes))
        ext_neg: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in roles]
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, ext_neg=ext_neg or None,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay), *handlers])
        if not assoc.is_established:
            raise PacsError(f"PACS {self._peer}: {self._why_not(assoc)}")
        _install_checkpoint(assoc)
        with self._assoc_lock:
            self.open_associations += 1
        try:
            yield assoc
        finally:
            with self._assoc_lock:
                self.open_associations -= 1
            if assoc.is_established:
                try:
                    _park_reactor(assoc)
                    assoc.release()
                except Exception:  # noqa: BLE001 - releasing a broken association: abort instead
                    assoc.abort()

    @staticmethod
    def _accepted(assoc: Association, abstract: str) -> bool:
        return any(cx.abstract_syntax == abstract for cx in assoc.accepted_contexts)

    def _find(self, assoc: Association, query: Dataset, model: str) -> list[Dataset]:
        results: list[Dataset] = []
        _park_reactor(assoc)
        for status, identifier in assoc.send_c_find(query, model):
            if "Status" not in status:
                raise PacsError(f"PACS {self._peer}: C-FIND got no response (association aborted or timed out)")
            code = int(status.Status)
            if code in _PENDING:
                if identifier is not None:
                    results.append(identifier)
            elif code != 0x0000:
                raise _FindRefused(f"PACS {self._peer}: C-FIND failed, {_status_text(status)}")
        return results

    def _find_studies(self, assoc: Association, **match: str) -> list[Dataset]:
        """STUDY-level C-FIND; asked again without the Issuer of Accession Number Sequence if refused."""
        try:
            return self._find(assoc, self._study_query(with_sequence=True, **match),
                              StudyRootQueryRetrieveInformationModelFind)
        except _FindRefused:
            return self._find(assoc, self._study_query(with_sequence=False, **match),
                              StudyRootQueryRetrieveInformationModelFind)

    # -- queries -------------------------------------------------------------------------------------
    async def ping(self) -> None:
        await anyio.to_thread.run_sync(self._ping_sync)

    def _ping_sync(self) -> None:
        with self._association([(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]) as assoc:
            _park_reactor(assoc)
            status = assoc.send_c_echo()
            if "Status" not in status or int(status.Status) != 0:
                raise PacsError(f"PACS {self._peer}: C-ECHO failed, {_status_text(status)}")

    async def find_patients(self, query: PatientQuery) -> list[PatientRecord]:
        return await anyio.to_thread.run_sync(self._find_patients_sync, query)

    def _find_patients_sync(self, query: PatientQuery) -> list[PatientRecord]:
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts = [(PatientRootQueryRetrieveInformationModelFind, syntaxes),
                    (StudyRootQueryRetrieveInformationModelFind, syntaxes)]
        criteria: list[dict[str, str]] = []
        dates = _range(query.birth_date_from, query.birth_date_to)
        names = _family_variants(query.family or "")
        if names:
            criteria += [{"PatientName": f"{n}*", "PatientBirthDate": dates} for n in names]
        elif dates:
            criteria.append({"PatientBirthDate": dates})
        criteria += [{"PatientID": pid} for pid in query.patient_ids if pid]
        if not criteria:
            criteria.append({})
        found: dict[tuple[str, str | None], PatientRecord] = {}
        with self._association(contexts) as assoc:
            patient_root = self._accepted(assoc, PatientRootQueryRetrieveInformationModelFind)
            if not patient_root and not self._accepted(assoc, StudyRootQueryRetrieveInformationModelFind):
                raise PacsError(f"PACS {self._peer} accepts neither Patient Root nor Study Root C-FIND")
            for crit in criteria:
                ds = Dataset()
                ds.QueryRetrieveLevel = "PATIENT" if patient_root else "STUDY"
                for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex"):
                    setattr(ds, keyword, crit.get(keyword, ""))
                if not patient_root:
                    ds.StudyInstanceUID = ""
                model = (PatientRootQueryRetrieveInformationModelFind if patient_root
                         else StudyRootQueryRetrieveInformationModelFind)
                for r in self._find(assoc, ds, model):
                    rec = PatientRecord(dv.text(r, "PatientID"), dv.text(r, "IssuerOfPatientID") or None,
                                        dv.text(r, "PatientName"), dv.text(r, "PatientBirthDate"),
                                        dv.text(r, "PatientSex"))
                    if rec.PatientID:
                        found.setdefault((rec.PatientID, rec.IssuerOfPatientID), rec)
        return list(found.values())

    _FIND_CONTEXTS = [(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]

    @staticmethod
    def _study_query(*, with_sequence: bool, **match: str) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        for keyword in ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                        "StudyDescription", "ReferringPhysicianName", "PatientName", "PatientID",
                        "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "ModalitiesInStudy",
                        "RetrieveAETitle", "NumberOfStudyRelatedInstances"):
            setattr(ds, keyword, match.get(keyword, ""))
        if with_sequence:  # a sequence return key: some PACS refuse it, see _find_studies
            ds.IssuerOfAccessionNumberSequence = []
        return ds

    def _tree(self, assoc: Association, study: Dataset) -> StudyInfo:
        uid = dv.text(study, "StudyInstanceUID")
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = uid
        for keyword in ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
                        "NumberOfSeriesRelatedInstances"):
            setattr(q, keyword, "")
        series: list[SeriesInfo] = []
        for s in sorted(self._find(assoc, q, StudyRootQueryRetrieveInformationModelFind),
                        key=lambda d: (dv.integer(d, "SeriesNumber") or 0, dv.text(d, "SeriesInstanceUID"))):
            series_uid = dv.text(s, "SeriesInstanceUID")
            if not series_uid:
                continue
            iq = Dataset()
            iq.QueryRetrieveLevel = "IMAGE"
            iq.StudyInstanceUID = uid
            iq.SeriesInstanceUID = series_uid
            iq.SOPInstanceUID = ""
            iq.SOPClassUID = ""
            iq.InstanceNumber = ""
            instances = sorted(
                (InstanceInfo(dv.text(i, "SOPClassUID"), dv.text(i, "SOPInstanceUID"), dv.integer(i, "InstanceNumber"))
                 for i in self._find(assoc, iq, StudyRootQueryRetrieveInformationModelFind)
                 if dv.text(i, "SOPInstanceUID")),
                key=lambda i: (i.InstanceNumber if i.InstanceNumber is not None else 1 << 30, i.SOPInstanceUID))
            series.append(SeriesInfo(series_uid, dv.text(s, "Modality"), dv.integer(s, "SeriesNumber"),
                                     dv.text(s, "SeriesDescription"), dv.text(s, "BodyPartExamined"), tuple(instances)))
        patient = PatientRecord(dv.text(study, "PatientID"), dv.text(study, "IssuerOfPatientID") or None,
                                dv.text(study, "PatientName"), dv.text(study, "PatientBirthDate"),
                                dv.text(study, "PatientSex"))
        retrieve_aet = dv.text(study, "RetrieveAETitle").split("\\")[0] or self.retrieve_ae_title
        return StudyInfo(
            StudyInstanceUID=uid, patient=patient, StudyDate=dv.text(study, "StudyDate"),
            StudyTime=dv.text(study, "StudyTime"),
            AccessionNumber=dv.text(study, "AccessionNumber"), AccessionNumberIssuer=accession_issuer(study),
            StudyID=dv.text(study, "StudyID"), StudyDescription=dv.text(study, "StudyDescription"),
            ReferringPhysicianName=dv.text(study, "ReferringPhysicianName"), series=tuple(series),
            source_id=self.source_id, RetrieveAETitle=retrieve_aet)

    async def find_studies(self, patient_id: str, issuer: str | None = None) -> list[StudyInfo]:
        return await anyio.to_thread.run_sync(self._find_studies_sync, patient_id, issuer)

    def _find_studies_sync(self, patient_id: str, issuer: str | None) -> list[StudyInfo]:
        if not patient_id:
            return []
        with self._association(self._FIND_CONTEXTS) as assoc:
            studies = self._find_studies(assoc, PatientID=patient_id)
            out = []
            for st in sorted(studies, key=lambda d: (dv.text(d, "StudyDate"), dv.text(d, "StudyInstanceUID"))):
                if dv.text(st, "PatientID") and dv.text(st, "PatientID") != patient_id:
                    continue  # a PACS that treats the ID as a pattern
                study_issuer = dv.text(st, "IssuerOfPatientID")
                if issuer and study_issuer and study_issuer != issuer:
                    continue
                out.append(self._tree(assoc, st))
        return out

    async def get_study(self, study_instance_uid: str) -> StudyInfo | None:
        return await anyio.to_thread.run_sync(self._get_study_sync, study_instance_uid)

    def _get_study_sync(self, study_instance_uid: str) -> StudyInfo | None:
        if not study_instance_uid:
            return None
        with self._association(self._FIND_CONTEXTS) as assoc:
            studies = [s for s in self._find_studies(assoc, StudyInstanceUID=study_instance_uid)
                       if dv.text(s, "StudyInstanceUID") == study_instance_uid]
            return self._tree(assoc, studies[0]) if studies else None

    # -- retrieve ------------------------------------------------------------------------------------
    async def retrieve(self, refs: Sequence[InstanceRef]) -> AsyncIterator[RetrievedInstance | RetrieveFailure]:
        if not refs:
            return
        send, recv = anyio.create_memory_object_stream[Item](self.queue_size)
        channel = _Channel(send, anyio.lowlevel.current_token())
        worker = threading.Thread(target=self._retrieve_worker, args=(list(refs), channel),
                                  name=f"xig-{self.retrieve_method}", daemon=True)
        self._threads.add(worker)
        active = (channel, recv)
        self._active.add(active)
        worker.start()
        try:
            async with recv:
                async for item in recv:
                    yield item
        except anyio.ClosedResourceError:
            raise PacsError(f"retrieve from {self._peer} interrupted: the backend was closed") from None
        finally:
            channel.cancelled.set()  # closing ``recv`` also wakes a producer blocked in ``send``
            self._active.discard(active)

    def _retrieve_worker(self, refs: list[InstanceRef], channel: _Channel) -> None:
        session = _Session(channel)
        for ref in refs:
            session.waiting.setdefault(ref.SOPInstanceUID, []).append(ref)
        try:
            located = self._locate(refs, session)
            if located and not channel.cancelled.is_set():
                if self.retrieve_method == "c-get":
                    self._get(located, session)
                else:
                    self._move(located, session)
            session.fail_all("not delivered by the PACS")
        except PacsError as exc:
            session.fail_all(str(exc))
        except Exception as exc:  # noqa: BLE001 - never leave the consumer waiting
            log.exception("DIMSE retrieve from %s failed", self._peer)
            session.fail_all(f"retrieve failed: {type(exc).__name__}: {exc}")
        finally:
            channel.close()
            self._threads.discard(threading.current_thread())

    def _locate(self, refs: list[InstanceRef], session: _Session) -> dict[tuple[str, str], dict[str, str]]:
        """C-FIND the requested instances: ``{(study, series): {sop: sop_class}}``; unknown ones fail now."""
        groups: dict[tuple[str, str], list[str]] = {}
        for ref in refs:
            sops = groups.setdefault((ref.StudyInstanceUID, ref.SeriesInstanceUID), [])
            if ref.SOPInstanceUID not in sops:
                sops.append(ref.SOPInstanceUID)
        located: dict[tuple[str, str], dict[str, str]] = {}
        with self._association(self._FIND_CONTEXTS) as assoc:
            for (study, series), sops in groups.items():
                found: dict[str, str] = {}
                for i in range(0, len(sops), _UID_BATCH):
                    q = Dataset()
                    q.QueryRetrieveLevel = "IMAGE"
                    q.StudyInstanceUID = study
                    q.SeriesInstanceUID = series
                    q.SOPInstanceUID = sops[i:i + _UID_BATCH]
                    q.SOPClassUID = ""
                    for r in self._find(assoc, q, StudyRootQueryRetrieveInformationModelFind):
                        found[dv.text(r, "SOPInstanceUID")] = dv.text(r, "SOPClassUID")
                missing = [sop for sop in sops if sop not in found]
                if missing and not session.fail(missing, f"not found on PACS {self._peer} in study {study} / "
                                                         f"series {series}", missing=True):
                    return {}
                wanted = {sop: found[sop] for sop in sops if sop in found}
                if wanted:
                    located[(study, series)] = wanted
        return located

    def _get(self, located: dict[tuple[str, str], dict[str, str]], session: _Session) -> None:
        classes = sorted({c for sops in located.values() for c in sops.values() if c})
        per_assoc = max(1, _MAX_CONTEXTS // len(RETRIEVE_TRANSFER_SYNTAXES))
        for start in range(0, max(1, len(classes)), per_assoc):
            group = set(classes[start:start + per_assoc])
            contexts: list[tuple[str, Sequence[str]]] = [
                (StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
            contexts += [(c, [ts]) for c in sorted(group) for ts in RETRIEVE_TRANSFER_SYNTAXES]

            def on_store(event: evt.Event) -> int:
                return session.deliver(event)

            with self._association(contexts, roles=sorted(group), handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
                if not self._accepted(assoc, StudyRootQueryRetrieveInformationModelGet):
                    raise PacsError(f"PACS {self._peer} does not accept Study Root C-GET")
                for (study, series), sops in located.items():
                    uids = [sop for sop, c in sops.items() if c in group or (not c and start == 0)]
                    for i in range(0, len(uids), _UID_BATCH):
                        batch = uids[i:i + _UID_BATCH]
                        if not self._get_move_batch(assoc, study, series, batch, session, move=False):
                            return

    def _move(self, located: dict[tuple[str, str], dict[str, str]], session: _Session) -> None:
        receiver = self._move_receiver()
        receiver.ensure_started()
        sops_all = [sop for sops in located.values() for sop in sops]
        receiver.register(session, sops_all)
        try:
            contexts = [(StudyRootQueryRetrieveInformationModelMove, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
            with self._association(contexts) as assoc:
                if not self._accepted(assoc, StudyRootQueryRetrieveInformationModelMove):
                    raise PacsError(f"PACS {self._peer} does not accept Study Root C-MOVE")
                for (study, series), sops in located.items():
                    uids = list(sops)
                    for i in range(0, len(uids), _UID_BATCH):
                        if not self._get_move_batch(assoc, study, series, uids[i:i + _UID_BATCH], session,
                                                    move=True):
                            return
        finally:
            receiver.unregister(sops_all, session)

    def _get_move_batch(self, assoc: Association, study: str, series: str, sops: list[str], session: _Session,
                        *, move: bool) -> bool:
        """One IMAGE-level C-GET/C-MOVE; ``False`` when the retrieve must stop (consumer gone)."""
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series
        q.SOPInstanceUID = sops if len(sops) > 1 else sops[0]
        op = "C-MOVE" if move else "C-GET"
        _park_reactor(assoc)
        if move:
            responses = assoc.send_c_move(q, self.move_destination, StudyRootQueryRetrieveInformationModelMove)
        else:
            responses = assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)
        final = Dataset()
        for status, _identifier in responses:
            if session.channel.cancelled.is_set():
                assoc.abort()
                return False
            if "Status" in status and int(status.Status) in _PENDING:
                continue
            final = status
        if session.channel.cancelled.is_set():
            assoc.abort()
            return False
        if "Status" not in final:
            raise PacsError(f"PACS {self._peer}: {op} got no final response (association aborted or timed out)")
        code = int(final.Status)
        outcome = "completed" if code == 0 else _status_text(final)
        return session.fail(sops, f"{op} {outcome} without delivering this instance")

    def _move_receiver(self) -> _MoveReceiver:
        if self._receiver is None:
            if not self.move_port:
                raise PacsError("C-MOVE needs move_port: the port of our Storage SCP, known to the PACS as "
                                f"AE {self.move_destination}")
            self._receiver = _MoveReceiver.acquire(self.move_destination, self.move_host, self.move_port,
                                                   self.max_pdu)
        return self._receiver

    # -- store ---------------------------------------------------------------------------------------
    async def store(self, files: Sequence[Path]) -> StoreResult:
        return await anyio.to_thread.run_sync(self._store_sync, list(files))

    def _store_sync(self, files: list[Path]) -> StoreResult:
        result = StoreResult()
        plan: list[tuple[Path, str, str, str]] = []  # path, sop instance, sop class, transfer syntax
        for path in files:
            try:
                meta = read_file_meta_info(path)
                plan.append((Path(path), dv.text(meta, "MediaStorageSOPInstanceUID"),
                             dv.text(meta, "MediaStorageSOPClassUID"), dv.text(meta, "TransferSyntaxUID")))
            except Exception as exc:  # noqa: BLE001 - unreadable file: report, go on
                result.failed[str(path)] = f"not a DICOM Part 10 file ({exc})"
        while plan:
            pairs: list[tuple[str, str]] = []
            batch: list[tuple[Path, str, str, str]] = []
            rest: list[tuple[Path, str, str, str]] = []
            for item in plan:
                pair = (item[2], item[3])
                if pair in pairs or len(pairs) < _MAX_CONTEXTS + 1:
                    if pair not in pairs:
                        pairs.append(pair)
                    batch.append(item)
                else:
                    rest.append(item)
            plan = rest
            with self._association([(c, [ts]) for c, ts in pairs]) as assoc:
                accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
                for path, sop, sop_class, ts in batch:
                    if (sop_class, ts) not in accepted:
                        result.failed[sop] = f"PACS does not accept SOP class {sop_class} in transfer syntax {ts}"
                        continue
                    try:
                        _park_reactor(assoc)
                        status = assoc.send_c_store(path)
                    except Exception as exc:  # noqa: BLE001 - one file failing must not stop the others
                        result.failed[sop] = f"C-STORE failed: {type(exc).__name__}: {exc}"
                        continue
                    if "Status" not in status:
                        raise PacsError(f"PACS {self._peer}: C-STORE got no response (association aborted)")
                    code = int(status.Status)
                    if code == 0 or (code & 0xF000) == 0xB000:
                        result.stored.append(sop)
                    else:
                        result.failed[sop] = f"C-STORE failed, {_status_text(status)}"
        return result

    async def aclose(self) -> None:
        """Stop retrieves still running (their consumers see the stream end), the C-MOVE SCP, the threads."""
        for channel, recv in list(self._active):
            channel.cancelled.set()
            recv.close()
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            await anyio.to_thread.run_sync(receiver.release)
        threads = list(self._threads)
        for t in threads:
            await anyio.to_thread.run_sync(t.join, self.dimse_timeout)
