"""The ``xig`` command line (typer + rich)."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from gateway.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from gateway.pacs.filesystem import FilesystemBackend

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="XIG — cross-community imaging gateway (IHE XCPD / XCA / XCA-I, Carequality).")
config_app = typer.Typer(no_args_is_help=True, help="Example and validation of configuration files.")
certs_app = typer.Typer(no_args_is_help=True, help="Test certificates (never for production).")
pacs_app = typer.Typer(no_args_is_help=True, help="The embedded filesystem PACS: import and list.")
app.add_typer(config_app, name="config")
app.add_typer(certs_app, name="certs")
app.add_typer(pacs_app, name="pacs")

console = Console()
err = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="XIG configuration file (TOML).")]


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]configuration error[/] in {exc.source}:")
        for p in exc.problems:
            err.print(f"  - {p}")
        raise typer.Exit(2) from None


def example_config_text() -> str:
    return resources.files("gateway").joinpath("example-config.toml").read_text(encoding="utf-8")


@config_app.command("example")
def config_example() -> None:
    """Print a fully commented example configuration."""
    typer.echo(example_config_text(), nl=False)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="configuration file to validate")]) -> None:
    """Validate a configuration file (syntax, types, required keys, referenced files)."""
    cfg = _load(file)
    console.print(f"[green]ok[/]: {file} — community {cfg.gateway.home_community_id}, "
                  f"listening on {cfg.server.listen}, {len(cfg.pacs)} PACS, {len(cfg.partners)} partner(s)")


@certs_app.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="folder to create the test PKI in")],
    host: Annotated[list[str] | None, typer.Option("--host", help="SAN of the gateway certificate")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing set")] = False,
) -> None:
    """Generate a TEST-ONLY CA, a gateway certificate (localhost/127.0.0.1) and a partner certificate."""
    from gateway.security.certs import init_certs

    try:
        certs = init_certs(directory, hosts=tuple(host or ("localhost", "127.0.0.1")), overwrite=force)
    except FileExistsError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"test PKI written to {certs.directory}: ca.crt, gateway.crt/.key, partner.crt/.key "
                  "([bold]test only[/])")


def _filesystem_store(cfg: Config, name: str | None) -> FilesystemBackend:
    from gateway.config import FilesystemPacs
    from gateway.pacs.filesystem import FilesystemBackend
    from gateway.store.db import open_database

    stores = [(i, p) for i, p in enumerate(cfg.pacs) if isinstance(p, FilesystemPacs)
              and (name is None or p.name == name)]
    if not cfg.pacs:  # the embedded default, as `xig serve` uses it
        stores = [(0, FilesystemPacs(kind="filesystem", path=cfg.base_dir / "var" / "pacs"))]
    if not stores:
        err.print("[red]no filesystem [pacs] entry in this configuration[/]"
                  + (f" named {name!r}" if name else ""))
        raise typer.Exit(2)
    _, entry = stores[0]
    entry.path.mkdir(parents=True, exist_ok=True)
    source = entry.imaging_source_id or cfg.gateway.imaging_source_id
    return FilesystemBackend(entry.path, open_database(cfg.database.url, cfg.base_dir), source, name=entry.name)


PacsName = Annotated[str | None, typer.Option("--pacs", help="name of the filesystem [[pacs]] entry")]


@pacs_app.command("import")
def pacs_import(config: ConfigOption,
                directory: Annotated[Path, typer.Argument(help="folder of DICOM files (searched recursively)")],
                pacs: PacsName = None) -> None:
    """Copy DICOM files into the embedded store and index them (idempotent; bad files are reported)."""
    if not directory.is_dir():
        err.print(f"[red]{directory} is not a folder[/]")
        raise typer.Exit(2)
    store = _filesystem_store(_load(config), pacs)
    report = store.index_directory(directory)
    for bad in report.failed:
        err.print(f"[yellow]not imported[/] {bad.source}: {bad.reason}")
    console.print(report.summary())
    raise typer.Exit(0 if report.ok else 1)


@pacs_app.command("ls")
def pacs_ls(config: ConfigOption, pacs: PacsName = None,
            patient: Annotated[str | None, typer.Option(help="list this patient's studies")] = None) -> None:
    """List the patients (or one patient's studies) in the embedded store."""
    from rich.table import Table

    store = _filesystem_store(_load(config), pacs)
    if patient is None:
        table = Table("Patient ID", "Name", "Birth date", "Sex", "Studies", "Instances")
        for p in store.list_patients():
            r = p.patient
            table.add_row(r.PatientID, r.PatientName, r.PatientBirthDate, r.PatientSex, str(p.studies),
                          str(p.instances))
    else:
        table = Table("Study date", "Description", "Modalities", "Accession", "Series", "Instances", "Study UID")
        for s in store.list_studies(patient):
            table.add_row(s.StudyDate, s.StudyDescription, "/".join(s.modalities), s.AccessionNumber,
                          str(s.series), str(s.instances), s.StudyInstanceUID)
    console.print(table)


@app.command("serve")
def serve(config: ConfigOption,
          verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
          workers: Annotated[int, typer.Option("--workers", "-w", min=1,
                                               help="worker processes sharing the listening socket and the "
                                                    "database (use a SQLite file or PostgreSQL)")] = 1) -> None:
    """Run the gateway (HTTPS with mutual TLS) until interrupted."""
    from gateway.soap.schema import default_schemas
    from gateway.web.server import serve as run

    cfg = _load(config)
    if workers > 1:
        _serve_workers(cfg, workers, verbose)
        return
    from gateway.logs import configure_logging

    configure_logging(cfg.observability.json_logs, logging.DEBUG if verbose else logging.INFO)
    default_schemas().warm()
    console.print(f"XIG serving community {cfg.gateway.home_community_id} on https://{cfg.server.listen}")
    run(cfg)


def _serve_workers(cfg: Config, workers: int, verbose: bool) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.web.workers import WorkerError, WorkerPool, serve_workers

    level = "debug" if verbose else "info"
    from gateway.logs import WORKER_TEXT_FORMAT, configure_logging

    configure_logging(cfg.observability.json_logs, logging.DEBUG if verbose else logging.INFO,
                      text_format=WORKER_TEXT_FORMAT)

    def ready(pool: WorkerPool) -> None:
        console.print(f"XIG serving community {cfg.gateway.home_community_id} on {pool.url} with {workers} worker "
                      f"processes ({', '.join(map(str, pool.pids))})")

    def replaced(pool: WorkerPool, dead: list[tuple[int | None, int | None]]) -> None:
        console.print(f"replaced worker(s) {', '.join(f'{pid} (exit code {code})' for pid, code in dead)}; "
                      f"workers now {', '.join(map(str, pool.pids))}")

    try:
        serve_workers(cfg, workers, log_level=level, on_ready=ready, on_replaced=replaced)
    except WorkerError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    except SQLAlchemyError as exc:
        err.print(f"[red]database {cfg.database.url.split('@')[-1]} is not usable: {str(exc).splitlines()[0]}[/]")
        raise typer.Exit(1) from None


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo writes its config and data")] = Path("demo-run"),
    port: Annotated[int, typer.Option(help="port to listen on (0 = any free port)")] = 8443,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve",
                                              help="keep serving after the self-check")] = True,
) -> None:
    """Start a responding gateway on the embedded default and show how to call it."""
    from gateway.demo import run_demo

    code = asyncio.run(run_demo(workdir, port, serve_after, console))
    raise typer.Exit(code)


def _register_import_commands() -> None:
    from gateway.cli_audit import register as register_audit
    from gateway.cli_conformance import register as register_conformance
    from gateway.cli_import import register
    from gateway.cli_steps import register as register_steps

    register(app, _load)
    register_steps(app, _load)
    register_audit(app, _load)
    register_conformance(app, _load)


_register_import_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
