"""``xig pull-priors`` and ``xig jobs``: the import station's commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from gateway.config import Config
from gateway.initiating.pull import JobBusyError, PullPriors, PullRequest, PullResult
from gateway.web import loop as event_loop

jobs_app = typer.Typer(no_args_is_help=True, help="Durable import jobs: list, show, resume.")
partners_app = typer.Typer(no_args_is_help=True, help="Partner communities: import a FHIR directory, list.")
console = Console()
err = Console(stderr=True)


@contextmanager
def _service(cfg: Config, *, as_json: bool) -> Iterator[tuple[PullPriors, Progress | None]]:
    from gateway.pacs.factory import open_backends
    from gateway.store.db import open_database
    from gateway.store.jobs import SqlJobStore
    from gateway.store.ledger import SqlPatientLinks
    from gateway.store.response_times import SqlResponseTimes

    engine = open_database(cfg.database.url, cfg.base_dir)
    if not cfg.pacs:
        err.print("[red]this configuration has no [pacs] to import into[/]")
        raise typer.Exit(2)
    from gateway.audit.assembly import audit_session

    audit = ExitStack()  # closed in the finally below, after the local PACS
    auditor = audit.enter_context(audit_session(cfg, engine))
    local = open_backends(cfg, engine, auditor=auditor)[0]
    progress = None if as_json else Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                             TextColumn("{task.fields[transferred]}"),
                                             console=console, transient=False)
    tasks: dict[str, Any] = {}  # study UID -> task
    communities: dict[str, Any] = {}  # homeCommunityId -> task
    study_community: dict[str, str] = {}
    transferred: dict[Any, int] = {}

    def advance(task: Any, size: int) -> None:
        assert progress is not None
        transferred[task] = transferred.get(task, 0) + size
        progress.update(task, advance=1, transferred=_bytes(transferred[task]))

    def report(event: str, data: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps({"event": event, **data}), file=sys.stderr, flush=True)
            return
        assert progress is not None
        if event == "study":
            community = data["community"]
            if community not in communities:
                communities[community] = progress.add_task(f"[bold]{community}[/]", total=0, transferred="")
            progress.update(communities[community], total=progress.tasks[communities[community]].total
                            + data["instances"])
            study_community[data["study"]] = community
            tasks[data["study"]] = progress.add_task(
                f"  {data['description'] or data['study']}", total=data["instances"], transferred="")
        elif event in ("stored", "failed") and data.get("study") in tasks:
            size = int(data.get("bytes", 0))
            advance(tasks[data["study"]], size)
            advance(communities[study_community[data["study"]]], size)
        elif event == "discovered":
            console.print(f"  {data['partner']}: {data['status']}")

    try:
        yield PullPriors(cfg, SqlJobStore(engine), SqlPatientLinks(engine), local, progress=report,
                         auditor=auditor, response_times=SqlResponseTimes(engine)), progress
    finally:
        event_loop.run_call(cfg.server.event_loop, local.aclose)
        audit.close()
        engine.dispose()


def _bytes(n: int) -> str:
    """1234567 → "1.2 MB" (decimal units, as rich's download columns)."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:.1f} {unit}"


def _table(result: PullResult) -> Table:
    t = Table("#", "Community", "Date", "Modality", "Description", "Instances", "Selected", "State")
    for i, s in enumerate(result.studies, 1):
        t.add_row(str(i), s.partner, s.study_date, s.modalities, s.description, str(s.instances),
                  "yes" if s.selected else "no", s.state)
    return t


def _as_json(result: PullResult) -> str:
    return json.dumps({"job": result.job_id, "complete": result.complete, "counts": result.counts,
                       "errors": result.errors,
                       "studies": [s.__dict__ for s in result.studies]}, indent=2)


def pull_priors(cfg: Config, request: PullRequest, *, yes: bool, as_json: bool) -> int:
    with _service(cfg, as_json=as_json) as (service, progress):
        if not as_json:
            console.print(f"discovering {request.family}^{request.given} {request.birth_date} {request.gender} "
                          f"at {len(request.partners) or len(cfg.partners)} partner(s)…")
        found = event_loop.run_call(cfg.server.event_loop, service.discover, request)
        if not as_json:
            console.print(_table(found))
            for e in found.errors:
                err.print(f"[yellow]warning[/] {e}")
        if not found.studies:
            if as_json:
                print(_as_json(found))
            else:
                console.print("no prior studies found")
            return 1
        if not yes:
            answer = typer.prompt("import which studies? (all, none, or numbers like 1,3)", default="all")
            if answer.strip().lower() == "none":
                return 1
            if answer.strip().lower() != "all":
                picked = {int(x) for x in answer.replace(" ", "").split(",") if x}
                service.select(found.job_id, [(s.home_community_id, s.study_instance_uid)
                                              for i, s in enumerate(found.studies, 1) if i in picked])
        return _run(service, progress, found.job_id, as_json=as_json)


def _run(service: PullPriors, progress: Progress | None, job_id: str, *, as_json: bool) -> int:
    try:
        if progress is not None:
            with progress:
                result = event_loop.run_call(service.config.server.event_loop, service.run, job_id)
        else:
            result = event_loop.run_call(service.config.server.event_loop, service.run, job_id)
    except JobBusyError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if as_json:
        print(_as_json(result))
    else:
        console.print(_table(result))
        for e in result.errors:
            err.print(f"[red]error[/] {e}")
        console.print(f"job {job_id}: {result.counts.get('stored', 0)} instances stored, "
                      f"{result.counts.get('failed', 0)} failed — {'complete' if result.complete else 'INCOMPLETE'}")
    return 0 if result.complete else 1


def register(app: typer.Typer, load: Any) -> None:
    """Add ``pull-priors`` and ``jobs`` to the main ``xig`` app (``load`` reads and checks a config)."""

    @app.command("pull-priors")
    def pull_priors_cmd(
        config: Annotated[Path, typer.Option("--config", "-c", help="XIG configuration file (TOML).")],
        family: Annotated[str, typer.Option(help="family name")],
        given: Annotated[str, typer.Option(help="given name")],
        birth_date: Annotated[str, typer.Option("--birth-date", help="YYYYMMDD")],
        gender: Annotated[str, typer.Option(help="F, M, O or U")],
        local_id: Annotated[str, typer.Option("--local-id", help="the patient's id in our assigning authority")],
        partner: Annotated[list[str] | None, typer.Option("--partner", help="partner name (repeatable)")] = None,
        yes: Annotated[bool, typer.Option("--yes", help="import everything found without asking")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """Discover a patient at partner communities and import their prior studies into the local PACS."""
        request = PullRequest(family, given, birth_date, gender.upper(), local_id, tuple(partner or ()))
        raise typer.Exit(pull_priors(load(config), request, yes=yes, as_json=as_json))

    @jobs_app.command("ls")
    def jobs_ls(config: Annotated[Path, typer.Option("--config", "-c")]) -> None:
        """Recent jobs."""
        from gateway.store.db import open_database
        from gateway.store.jobs import SqlJobStore

        cfg = load(config)
        store = SqlJobStore(open_database(cfg.database.url, cfg.base_dir))
        t = Table("Job", "Kind", "State", "Patient", "Stored", "Pending", "Failed", "Updated")
        for j in store.recent():
            c = store.counts(j.id)
            t.add_row(j.id[:8], j.kind, j.state, f"{j.params.get('local_id', '')}", str(c.get("stored", 0)),
                      str(c.get("pending", 0)), str(c.get("failed", 0)), j.updated_at.isoformat(timespec="seconds"))
        console.print(t)

    @jobs_app.command("show")
    def jobs_show(job: str, config: Annotated[Path, typer.Option("--config", "-c")]) -> None:
        """One job: its studies and instance counts."""
        from gateway.store.db import open_database
        from gateway.store.jobs import SqlJobStore

        cfg = load(config)
        store = SqlJobStore(open_database(cfg.database.url, cfg.base_dir))
        record = store.find(job)
        if record is None:
            err.print(f"[red]no job {job!r}[/]")
            raise typer.Exit(2)
        console.print(f"job {record.id} ({record.kind}) — {record.state}; counts {store.counts(record.id)}")
        console.print(_table(PullResult(record.id, store.studies(record.id))))

    @jobs_app.command("resume")
    def jobs_resume(job: str, config: Annotated[Path, typer.Option("--config", "-c")],
                    as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Finish an interrupted job: only instances not yet stored are fetched."""
        cfg = load(config)
        with _service(cfg, as_json=as_json) as (service, progress):
            record = service.store.find(job)
            if record is None:
                err.print(f"[red]no job {job!r}[/]")
                raise typer.Exit(2)
            raise typer.Exit(_run(service, progress, record.id, as_json=as_json))

    app.add_typer(jobs_app, name="jobs")

    @partners_app.command("import")
    def partners_import(file: Annotated[Path, typer.Argument(help="FHIR directory bundle (JSON)")],
                        config: Annotated[Path, typer.Option("--config", "-c")]) -> None:
        """Import a Carequality-style FHIR directory bundle (replaces the previous import)."""
        from gateway.initiating.partners import parse_fhir_directory
        from gateway.store.db import open_database
        from gateway.store.directory import SqlDirectory

        cfg = load(config)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            err.print(f"[red]cannot read {file}: {exc}[/]")
            raise typer.Exit(2) from None
        parsed = parse_fhir_directory(data)
        for w in parsed.warnings:
            err.print(f"[yellow]skipped[/] {w}")
        n = SqlDirectory(open_database(cfg.database.url, cfg.base_dir)).replace_all(parsed, str(file))
        console.print(f"{n} partner(s) imported from {file}")
        raise typer.Exit(0 if n else 1)

    @partners_app.command("ls")
    def partners_ls(config: Annotated[Path, typer.Option("--config", "-c")],
                    as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Every partner: configured [[partners]] and imported directory entries, with how long it usually
        takes to answer XCPD and XCA queries (the fan-outs ask the slowest first)."""
        import dataclasses

        from gateway.ihe.ebrim import normalize_hcid
        from gateway.initiating.partners import Partner, PartnerDirectory
        from gateway.store.db import open_database
        from gateway.store.directory import SqlDirectory
        from gateway.store.response_times import SqlResponseTimes

        cfg = load(config)
        engine = open_database(cfg.database.url, cfg.base_dir)
        try:
            imported = SqlDirectory(engine).partners()
            recorded = SqlResponseTimes(engine).all()
        finally:
            engine.dispose()
        partners = PartnerDirectory.from_config(cfg, extra=imported).partners()
        times: dict[str, dict[str, dict[str, Any]]] = {}
        for transaction, hcid, average, last, samples, updated in recorded:
            times.setdefault(hcid, {})[transaction] = {"average_seconds": round(average, 3),
                                                       "last_seconds": round(last, 3), "samples": samples,
                                                       "updated_at": updated.isoformat()}

        def usual(p: Partner) -> dict[str, dict[str, Any]]:
            return times.get(normalize_hcid(p.home_community_id), {})

        if as_json:
            print(json.dumps([dataclasses.asdict(p) | {"response_times": usual(p)} for p in partners], indent=2))
            return
        t = Table("Name", "homeCommunityId", "Source", "XCPD", "XCA query", "XCA retrieve", "XCA-I retrieve",
                  "Usually answers in")
        for p in partners:
            answers = "\n".join(f"{tr} {v['average_seconds']:.2f} s ({v['samples']}×)"
                                for tr, v in sorted(usual(p).items()))
            t.add_row(p.name, p.home_community_id, p.source, *("yes" if u else "-" for u in
                      (p.xcpd_url, p.xca_query_url, p.xca_retrieve_url, p.xcai_retrieve_url)), answers or "-")
        console.print(t)

    app.add_typer(partners_app, name="partners")
