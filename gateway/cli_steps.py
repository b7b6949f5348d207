"""``xig discover``, ``xig documents``, ``xig retrieve-kos``, ``xig retrieve-images``: the initiating side step by step.

Each command performs one IHE transaction (or one XCPD fan-out) against configured partners, prints what
the partner answered, and exits with 0 on success, 1 when a partner failed or answered with an error or
nothing was found, and 2 for usage or configuration errors. Failures of the exchange itself (unreachable
partner, TLS, SOAP fault, protocol violation) are printed as the :class:`PartnerError` sentence on stderr,
never as a traceback. ``--json`` prints a machine-readable document on stdout instead of tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.config import Config
from gateway.dicom.kos import KosError, KosManifest, parse_kos
from gateway.ihe import ebrim
from gateway.ihe.ebrim import DocumentEntry, MetadataError
from gateway.ihe.iti55 import PatientDemographics, PersonName
from gateway.ihe.registry import RegistryError
from gateway.initiating.client import (
    DEFAULT_TRANSFER_SYNTAXES,
    ImagesOutcome,
    PartnerClient,
    PartnerError,
    RetrievedManifest,
    open_soap_client,
)
from gateway.initiating.fanout import FanoutResult, discover_all
from gateway.initiating.partners import Partner, PartnerDirectory
from gateway.soap import mtom
from gateway.web import loop as event_loop
from gateway.web.client import SoapClient

if TYPE_CHECKING:
    from sqlalchemy import Engine

console = Console()
err = Console(stderr=True, soft_wrap=True)

_T = TypeVar("_T")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_DATE = re.compile(r"^\d{4}(\d{2}(\d{2})?)?$")

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="XIG configuration file (TOML).")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output on stdout")]


# --------------------------------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------------------------------


def _usage(message: str) -> NoReturn:
    err.print(f"[bold red]error[/] {escape(message)}")
    raise typer.Exit(2)


def _error(message: str) -> None:
    err.print(f"[bold red]error[/] {escape(message)}")


def _warn(message: str) -> None:
    err.print(f"[yellow]warning[/] {escape(message)}")


def _registry_error(e: RegistryError) -> str:
    where = f" at {e.location}" if e.location else ""
    return f"{e.severity.rsplit(':', 1)[-1]} {e.code}{where}: {e.context}"


def _emit(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str), flush=True)


def _directory(cfg: Config) -> PartnerDirectory:
    """``[[partners]]`` plus partners imported with ``xig partners import`` (when the database is readable)."""
    extra: list[Partner] = []
    try:
        from gateway.store.db import open_database
        from gateway.store.directory import SqlDirectory

        engine = open_database(cfg.database.url, cfg.base_dir)
        try:
            extra = SqlDirectory(engine).partners()
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - the imported directory is optional; [[partners]] still works
        _warn(f"imported partner directory not available ({type(exc).__name__}: {exc}); using [[partners]] only")
    return PartnerDirectory.from_config(cfg, extra=extra)


def _partner(directory: PartnerDirectory, name: str) -> Partner:
    found = directory.lookup(name)
    if found is None:
        known = ", ".join(p.name for p in directory.partners()) or "none configured"
        _usage(f"no partner named or with homeCommunityId {name!r} (known partners: {known})")
    return found


def _run(cfg: Config, work: Callable[[SoapClient], Awaitable[_T]], engine: Engine | None = None) -> _T:
    """Run ``work`` with a SOAP client made from the configuration; closed afterwards. ``engine``: the database
    the audit trail is kept in (default: the configured one, opened here)."""

    from gateway.audit.assembly import audit_session

    async def main() -> _T:
        soap = open_soap_client(cfg)
        try:
            return await work(soap)
        finally:
            await soap.aclose()

    with audit_session(cfg, engine):  # every request to a partner is audited (ATNA)
        return event_loop.run(main(), cfg.server.event_loop)


@contextlib.contextmanager
def _database(cfg: Config, *, as_json: bool) -> Iterator[Engine]:
    """The configured database (migrated), disposed afterwards; exit status 1 when it cannot be opened."""
    from gateway.store.db import open_database

    try:
        engine = open_database(cfg.database.url, cfg.base_dir)
    except Exception as exc:  # noqa: BLE001 - an operator tool prints a sentence, never a traceback
        _error(f"cannot open the database {cfg.database.url}: {type(exc).__name__}: {exc}")
        if as_json:
            _emit({"ok": False, "error": {"kind": "database", "message": f"{type(exc).__name__}: {exc}"}})
        raise typer.Exit(1) from None
    try:
        yield engine
    finally:
        engine.dispose()


def _partner_failure(exc: PartnerError, as_json: bool) -> NoReturn:
    _error(str(exc))
    if as_json:
        _emit({"ok": False, "error": _error_json(exc)})
    raise typer.Exit(1)


def _error_json(exc: PartnerError) -> dict[str, Any]:
    out: dict[str, Any] = {"partner": exc.partner, "transaction": exc.transaction, "kind": exc.kind,
                           "message": str(exc), "url": exc.url}
    if exc.fault is not None:
        out["fault"] = {"code": exc.fault.code, "subcode": str(exc.fault.subcode) if exc.fault.subcode else None,
                        "reason": exc.fault.reason, "detail": exc.fault.detail}
    return out


def _guarded(cfg: Config, work: Callable[[SoapClient], Awaitable[_T]], *, as_json: bool,
             engine: Engine | None = None) -> _T:
    """:func:`_run`, turning PartnerError and anything unexpected into a message and exit status 1."""
    try:
        return _run(cfg, work, engine)
    except PartnerError as exc:
        _partner_failure(exc, as_json)
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - an operator tool prints a sentence, never a traceback
        _error(f"internal error: {type(exc).__name__}: {exc}")
        if as_json:
            _emit({"ok": False, "error": {"kind": "internal", "message": f"{type(exc).__name__}: {exc}"}})
        raise typer.Exit(1) from None


def _out_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _usage(f"cannot create the output folder {path}: {exc.strerror or exc}")
    if not os.access(path, os.W_OK):
        _usage(f"the output folder {path} is not writable")
    return path


def _file_name(uid: str, suffix: str = ".dcm") -> str | None:
    """``<uid><suffix>`` when ``uid`` is safe as a file name, else None."""
    return f"{uid}{suffix}" if _SAFE.match(uid) and uid not in (".", "..") else None


def _write_atomic(directory: Path, name: str | None, data: bytes) -> Path:
    sink = mtom.FileSink(directory, name)
    try:
        sink.write(data)
        return sink.close()
    except BaseException:
        sink.abort()
        raise


# --------------------------------------------------------------------------------------------------
# discover (ITI-55 fan-out)
# --------------------------------------------------------------------------------------------------


def _discover_json(result: FanoutResult) -> dict[str, Any]:
    partners = []
    for name, slot in result.partners.items():
        item: dict[str, Any] = {"partner": name, "home_community_id": slot.partner.home_community_id,
                                "seconds": round(slot.seconds, 3)}
        if slot.outcome is not None:
            o = slot.outcome
            item.update(status=o.status, ack_code=o.ack_code, query_response_code=o.query_response_code,
                        matches=[{"patient_id": str(m.patient_id), "home_community_id": m.home_community_id,
                                  "health_data_locator": m.health_data_locator, "score": m.score}
                                 for m in o.matches],
                        more_attributes_requested=list(o.more_attributes_requested),
                        issue_codes=list(o.issue_codes), details=list(o.details), warnings=list(o.warnings))
        else:
            assert slot.error is not None
            item.update(status="failed", error=_error_json(slot.error))
        partners.append(item)
    return {"ok": bool(result.matches), "seconds": round(result.seconds, 3), "partners": partners,
            "communities": [{"home_community_id": c.home_community_id,
                             "partner": c.partner.name if c.partner else None,
                             "patient_ids": [str(p) for p in c.patient_ids], "reported_by": c.reported_by,
                             "problem": c.problem} for c in result.communities.values()]}


def _discover_table(result: FanoutResult) -> Table:
    t = Table("Partner", "Outcome", "Patient id(s)", "Custodian community", "Locator", "Time",
              caption="Locator: the community says it is (yes) or is not (no) a Health Data Locator for the "
                      "patient (XCPD Health Data Locator option; XIG does not send the ITI-56 location query)")
    for name, slot in result.partners.items():
        seconds = f"{slot.seconds:.2f} s"
        if slot.outcome is None:
            kind = slot.error.kind if slot.error else "error"
            t.add_row(escape(name), f"[red]failed ({kind})[/]", "", "", "", seconds)
            continue
        o = slot.outcome
        if o.status == "match":
            outcome = f"[green]match ({len(o.matches)})[/]"
        elif o.status == "no-match":
            outcome = "NF: no match"
        elif o.status == "more-attributes":
            outcome = "[yellow]more attributes: " + escape(", ".join(o.more_attributes_requested)) + "[/]"
        else:
            outcome = "[red]" + escape(o.summary()) + "[/]"
        locator = {True: "yes", False: "no", None: "–"}
        t.add_row(escape(name), outcome, escape("\n".join(str(m.patient_id) for m in o.matches)),
                  escape("\n".join(m.home_community_id for m in o.matches)),
                  "\n".join(locator[m.health_data_locator] for m in o.matches), seconds)
    return t


def discover(cfg: Config, demographics: PatientDemographics, *, partners: Sequence[str], local_id: str | None,
             as_json: bool) -> int:
    directory = _directory(cfg)
    for name in partners:
        _partner(directory, name)
    if not partners and not directory.partners("ITI-55"):
        _usage("no partner with an XCPD endpoint (xcpd_url) is configured")

    from gateway.store.response_times import SqlResponseTimes

    with _database(cfg, as_json=as_json) as engine:
        times = SqlResponseTimes(engine)  # the usually slowest partners are asked first

        async def work(soap: SoapClient) -> FanoutResult:
            return await discover_all(cfg, directory, demographics, partners=list(partners) or None,
                                      local_patient_id=local_id, soap_client=soap, response_times=times)

        result = _guarded(cfg, work, as_json=as_json, engine=engine)
    for name, slot in result.partners.items():
        if slot.error is not None:
            _error(str(slot.error))
        elif slot.outcome is not None:
            for w in slot.outcome.warnings:
                _warn(f"partner {name}: {w}")
    for c in result.unreachable_communities:
        _warn(c.problem or f"community {c.home_community_id} is unknown")
    if as_json:
        _emit(_discover_json(result))
    else:
        console.print(_discover_table(result))
        console.print(f"{len(result.matches)} match(es) at {len(result.partners)} partner(s) in "
                      f"{result.seconds:.2f} s")
    return 0 if result.matches else 1


# --------------------------------------------------------------------------------------------------
# documents (ITI-38)
# --------------------------------------------------------------------------------------------------

_DICOM_SCHEME = "1.2.840.10008.2.16.4"


def _modalities(e: DocumentEntry) -> list[str]:
    dicom = [c.code for c in e.event_codes if c.scheme == _DICOM_SCHEME]
    return dicom or [c.code for c in e.event_codes]


def _entry_json(e: DocumentEntry) -> dict[str, Any]:
    return {"unique_id": e.unique_id, "entry_uuid": e.entry_uuid, "home_community_id": e.home_community_id,
            "repository_unique_id": e.repository_unique_id, "patient_id": e.patient_id,
            "date": e.service_start_time or e.creation_time, "modalities": _modalities(e), "title": e.title,
            "entry_type": "on-demand" if e.is_on_demand else "stable", "mime_type": e.mime_type, "size": e.size}


def documents(cfg: Config, partner_name: str, patient_id: str, *, as_json: bool) -> int:
    try:
        pid = ebrim.parse_cx(patient_id)
    except MetadataError as exc:
        _usage(f"--patient-id {patient_id!r}: {exc} (expected ID^^^&OID&ISO)")
    if not pid.assigning_authority:
        _usage(f"--patient-id {patient_id!r} names no assigning authority (expected ID^^^&OID&ISO)")
    partner = _partner(_directory(cfg), partner_name)

    async def work(soap: SoapClient) -> Any:
        return await PartnerClient(cfg, partner, soap).find_manifests(pid)

    t0 = time.monotonic()
    found = _guarded(cfg, work, as_json=as_json)
    seconds = time.monotonic() - t0
    for e in found.errors:
        (_warn if e.is_warning else _error)(f"partner {partner.name}, ITI-38: {_registry_error(e)}")
    for p in found.problems:
        _warn(f"partner {partner.name}, ITI-38: {p}")
    if as_json:
        _emit({"ok": bool(found), "partner": partner.name, "patient_id": str(pid), "status": found.status,
               "seconds": round(seconds, 3), "documents": [_entry_json(e) for e in found],
               "errors": [{"code": e.code, "context": e.context, "location": e.location, "severity": e.severity}
                          for e in found.errors], "problems": found.problems})
    else:
        t = Table("uniqueId", "Date", "Modalities", "Title", "Type", "Repository")
        for e in found:
            t.add_row(escape(e.unique_id), escape((e.service_start_time or e.creation_time or "")[:8]),
                      escape(", ".join(_modalities(e))), escape(e.title or ""),
                      "On-Demand" if e.is_on_demand else "Stable", escape(e.repository_unique_id or ""))
        console.print(t)
        console.print(f"{len(found)} imaging manifest(s) for {escape(str(pid))} at {escape(partner.name)} "
                      f"in {seconds:.2f} s")
    return 0 if len(found) else 1


# --------------------------------------------------------------------------------------------------
# retrieve-kos (ITI-39)
# --------------------------------------------------------------------------------------------------


async def _locate(client: PartnerClient, document_ids: Sequence[str]) -> dict[str, DocumentEntry]:
    """ITI-38 GetDocuments at the partner: the entries (with repositoryUniqueId) of ``document_ids``."""
    result = await client.get_documents(document_ids)
    for e in result.errors:
        (_warn if e.is_warning else _error)(f"partner {client.partner.name}, ITI-38 GetDocuments: "
                                            f"{_registry_error(e)}")
    return {e.unique_id: e for e in result.entries}


def _kos_counts(kos: KosManifest) -> dict[str, int]:
    return {"studies": len({r.study_uid for r in kos.references}),
            "series": len({(r.study_uid, r.series_uid) for r in kos.references}),
            "instances": len(kos.references)}


def retrieve_kos(cfg: Config, partner_name: str, document_ids: Sequence[str], repository_id: str | None,
                 out: Path, *, as_json: bool) -> int:
    partner = _partner(_directory(cfg), partner_name)
    ids = list(dict.fromkeys(d.strip() for d in document_ids if d.strip()))
    if not ids:
        _usage("give at least one --document-id")
    out = _out_dir(out)

    async def work(soap: SoapClient) -> tuple[list[RetrievedManifest], list[str]]:
        client = PartnerClient(cfg, partner, soap)
        missing: list[str] = []
        if repository_id:
            entries = [DocumentEntry(entry_uuid="", unique_id=d, patient_id="", mime_type="application/dicom",
                                     home_community_id=partner.home_community_id,
                                     repository_unique_id=repository_id) for d in ids]
        else:
            known = await _locate(client, ids)
            missing = [d for d in ids if d not in known]
            entries = [known[d] for d in ids if d in known]
        return (await client.retrieve_manifests(entries) if entries else []), missing

    results, missing = _guarded(cfg, work, as_json=as_json)
    rows: list[dict[str, Any]] = []
    for d in missing:
        _error(f"partner {partner.name}: document {d} is unknown there (ITI-38 GetDocuments found no entry; "
               "give --repository-id to skip the lookup)")
        rows.append({"document_id": d, "ok": False, "problem": "not found by GetDocuments"})
    for m in results:
        row: dict[str, Any] = {"document_id": m.request.document_unique_id, "ok": m.ok,
                               "repository_unique_id": m.request.repository_unique_id,
                               "new_document_unique_id": m.new_document_unique_id,
                               "new_repository_unique_id": m.new_repository_unique_id}
        for w in m.warnings:
            _warn(f"partner {partner.name}, ITI-39: {_registry_error(w)}")
        if m.kos is not None and m.data is not None:
            name = _file_name(m.new_document_unique_id or m.request.document_unique_id)
            try:
                path = _write_atomic(out, name, m.data)
            except OSError as exc:
                _error(f"cannot write the KOS of {m.request.document_unique_id} into {out}: {exc}")
                row.update(ok=False, problem=f"write failed: {exc}")
            else:
                row.update(path=str(path), study_instance_uid=m.kos.study_instance_uid, **_kos_counts(m.kos))
        elif m.error is not None:
            _error(f"partner {partner.name}, ITI-39: {_registry_error(m.error)}")
            row.update(error={"code": m.error.code, "context": m.error.context, "location": m.error.location})
        else:
            _error(f"partner {partner.name}, ITI-39: {m.problem}")
            row.update(problem=m.problem)
        rows.append(row)
    if as_json:
        _emit({"ok": all(r["ok"] for r in rows), "partner": partner.name, "documents": rows})
    else:
        t = Table("Document", "Study", "Series", "Instances", "NewDocumentUniqueId", "File")
        for r in rows:
            if r["ok"]:
                t.add_row(escape(r["document_id"]), str(r["studies"]), str(r["series"]), str(r["instances"]),
                          escape(r["new_document_unique_id"] or "-"), escape(r["path"]))
            else:
                t.add_row(escape(r["document_id"]), "[red]failed[/]", "", "", "", "")
        console.print(t)
    return 0 if rows and all(r["ok"] for r in rows) else 1


# --------------------------------------------------------------------------------------------------
# retrieve-images (RAD-75)
# --------------------------------------------------------------------------------------------------


def _images_summary(kos: KosManifest, outcome: ImagesOutcome) -> list[dict[str, Any]]:
    series: dict[tuple[str, str], dict[str, Any]] = {}
    for r in outcome.results.values():
        req = r.request
        s = series.setdefault((req.study_instance_uid, req.series_instance_uid), {
            "study_instance_uid": req.study_instance_uid, "series_instance_uid": req.series_instance_uid,
            "requested": 0, "delivered": 0, "failed": 0, "errors": Counter()})
        s["requested"] += 1
        if r.ok:
            s["delivered"] += 1
        else:
            s["failed"] += 1
            s["errors"][r.error_code or "unknown"] += 1
    return [{**s, "errors": dict(s["errors"])} for s in series.values()]


def retrieve_images(cfg: Config, partner_name: str, kos_file: Path, out: Path, transfer_syntaxes: Sequence[str],
                    *, as_json: bool) -> int:
    partner = _partner(_directory(cfg), partner_name)
    try:
        kos = parse_kos(kos_file)
    except FileNotFoundError:
        _usage(f"--kos {kos_file}: no such file")
    except KosError as exc:
        _usage(f"--kos {kos_file}: {exc}")
    except OSError as exc:
        _usage(f"--kos {kos_file}: {exc.strerror or exc}")
    out = _out_dir(out)
    syntaxes = tuple(transfer_syntaxes) or DEFAULT_TRANSFER_SYNTAXES
    plan = kos.plan()
    if not plan:
        _usage(f"--kos {kos_file}: the manifest references no instances")

    async def work(soap: SoapClient) -> ImagesOutcome:
        return await PartnerClient(cfg, partner, soap).retrieve_images(
            plan, sink_factory=lambda _info: mtom.FileSink(out), transfer_syntaxes=syntaxes)

    t0 = time.monotonic()
    outcome = _guarded(cfg, work, as_json=as_json)
    seconds = time.monotonic() - t0
    files: dict[str, str] = {}
    for uid, r in outcome.results.items():
        if not r.ok:
            continue
        path = Path(r.delivered)
        name = _file_name(uid)
        if name is not None:
            try:
                os.replace(path, out / name)
                path = out / name
            except OSError as exc:
                _warn(f"instance {uid} kept as {path}: cannot rename it to {name}: {exc}")
        files[uid] = str(path)
    for p in outcome.problems:
        _warn(f"partner {partner.name}, RAD-75: {p}")
    failed = outcome.failed
    shown_errors: set[str] = set()
    for r in failed:  # one line per distinct cause, plus the instances it affected
        key = f"{r.error_code}: {r.error_context}"
        if key in shown_errors:
            continue
        shown_errors.add(key)
        n = sum(1 for x in failed if f"{x.error_code}: {x.error_context}" == key)
        _error(f"partner {partner.name}, RAD-75: {n} instance(s) failed with {r.error_code}: {r.error_context}")
    summary = _images_summary(kos, outcome)
    total, delivered = len(outcome.results), len(outcome.delivered)
    if as_json:
        _emit({"ok": outcome.ok, "partner": partner.name, "kos": str(kos_file),
               "study_instance_uid": kos.study_instance_uid, "requested": total, "delivered": delivered,
               "failed": total - delivered, "batches": outcome.batches, "seconds": round(seconds, 3),
               "series": summary, "files": files,
               "failures": [{"sop_instance_uid": r.request.sop_instance_uid, "error_code": r.error_code,
                             "error_context": r.error_context} for r in failed]})
    else:
        t = Table("Series", "Requested", "Delivered", "Failed", "Error codes")
        for s in summary:
            t.add_row(escape(s["series_instance_uid"]), str(s["requested"]), str(s["delivered"]),
                      f"[red]{s['failed']}[/]" if s["failed"] else "0",
                      escape(", ".join(f"{c} ×{n}" for c, n in s["errors"].items())))
        console.print(t)
        console.print(f"{delivered}/{total} instance(s) of study {escape(kos.study_instance_uid)} written to "
                      f"{escape(str(out))} in {outcome.batches} request(s), {seconds:.2f} s")
    return 0 if outcome.ok else 1


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------


def _demographics(family: str, given: str, birth_date: str, gender: str) -> PatientDemographics:
    g = gender.strip().upper()
    if g not in ("F", "M", "O", "U"):
        _usage(f"--gender {gender!r}: expected F, M, O or U")
    if not _DATE.match(birth_date.strip()):
        _usage(f"--birth-date {birth_date!r}: expected YYYYMMDD")
    if not family.strip() and not given.strip():
        _usage("give --family and/or --given")
    return PatientDemographics(names=(PersonName(family=(family.strip(),) if family.strip() else (),
                                                 given=(given.strip(),) if given.strip() else ()),),
                               gender=g, birth_time=birth_date.strip())


def register(app: typer.Typer, load: Callable[[Path], Config]) -> None:
    """Add ``discover``, ``documents``, ``retrieve-kos`` and ``retrieve-images`` to ``app`` (``load`` reads and
    checks a config, exiting with status 2 when it is invalid)."""

    @app.command("discover")
    def discover_cmd(
        config: ConfigOption,
        family: Annotated[str, typer.Option(help="family name")],
        given: Annotated[str, typer.Option(help="given name")],
        birth_date: Annotated[str, typer.Option("--birth-date", help="YYYYMMDD")],
        gender: Annotated[str, typer.Option(help="F, M, O or U")],
        local_id: Annotated[str | None, typer.Option("--local-id", help="our id for the patient (sent so the "
                                                                        "partner can query us back)")] = None,
        partner: Annotated[list[str] | None, typer.Option("--partner", help="partner name or homeCommunityId "
                                                                            "(repeatable; default: all)")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """ITI-55 patient discovery at every (or the given) partner, concurrently; per partner outcome and time."""
        demographics = _demographics(family, given, birth_date, gender)
        raise typer.Exit(discover(load(config), demographics, partners=partner or [], local_id=local_id,
                                  as_json=as_json))

    @app.command("documents")
    def documents_cmd(
        config: ConfigOption,
        partner: Annotated[str, typer.Option("--partner", help="partner name or homeCommunityId")],
        patient_id: Annotated[str, typer.Option("--patient-id", help="the partner's id: 'ID^^^&OID&ISO'")],
        as_json: JsonOption = False,
    ) -> None:
        """ITI-38 FindDocuments for imaging manifests (KOS) of a patient at one partner."""
        raise typer.Exit(documents(load(config), partner, patient_id, as_json=as_json))

    @app.command("retrieve-kos")
    def retrieve_kos_cmd(
        config: ConfigOption,
        partner: Annotated[str, typer.Option("--partner", help="partner name or homeCommunityId")],
        document_id: Annotated[list[str], typer.Option("--document-id", help="KOS DocumentEntry.uniqueId "
                                                                             "(repeatable)")],
        out: Annotated[Path, typer.Option("--out", help="folder to write the manifests to")],
        repository_id: Annotated[str | None, typer.Option(
            "--repository-id", help="repositoryUniqueId of the documents (default: looked up with ITI-38 "
                                    "GetDocuments)")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """ITI-39 retrieve of KOS manifests; each is written to --out and its study/series/instances counted."""
        raise typer.Exit(retrieve_kos(load(config), partner, document_id, repository_id, out, as_json=as_json))

    @app.command("retrieve-images")
    def retrieve_images_cmd(
        config: ConfigOption,
        partner: Annotated[str, typer.Option("--partner", help="partner name or homeCommunityId")],
        kos: Annotated[Path, typer.Option("--kos", help="a KOS manifest file (from retrieve-kos)")],
        out: Annotated[Path, typer.Option("--out", help="folder to write the instances to")],
        transfer_syntax: Annotated[list[str] | None, typer.Option(
            "--transfer-syntax", help="acceptable transfer syntax UID (repeatable; default: explicit and "
                                      "implicit VR little endian)")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """RAD-75 retrieve of every instance a KOS references, streamed to files in --out; summary per series."""
        raise typer.Exit(retrieve_images(load(config), partner, kos, out, transfer_syntax or [], as_json=as_json))


__all__ = ["discover", "documents", "register", "retrieve_images", "retrieve_kos"]
