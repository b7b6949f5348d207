"""``xig conformance simulate``: run a simulated responding community and judge an initiating gateway.

``register(group, load)`` adds the command to the ``conformance`` typer group (``load`` reads and checks
a configuration file and exits 2 on problems, as every ``xig`` command does). Exit status: 0 when at
least one request was received and every one passed every check, 1 otherwise (failed checks, no
request at all, the simulator could not start), 2 for usage errors (configuration, fixture, ``--fault``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from conformance.model import ScenarioResult
from conformance.simulator.faults import FaultSpec, parse_fault
from conformance.simulator.fixture import Fixture, FixtureError, load_fixture
from conformance.simulator.report import format_summary, summarize
from conformance.simulator.simulator import Simulator
from gateway.config import Config, ConfigError, load_config

console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Loader = Callable[[Path], Config]


def _usage_error(source: str, problems: list[str]) -> typer.Exit:
    err.print(f"[bold red]error[/] in {source}:")
    for p in problems:
        err.print(f"  - {p}", markup=False)
    return typer.Exit(2)


def _fixture(path: Path, faults: list[str]) -> tuple[Fixture, list[FaultSpec]]:
    try:
        fixture = load_fixture(path)
    except FixtureError as exc:
        raise _usage_error(exc.source, exc.problems) from None
    specs, problems = [], []
    for text in faults:
        try:
            specs.append(parse_fault(text))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise _usage_error("--fault", problems)
    return fixture, specs


def _print_result(result: ScenarioResult) -> None:
    failed = [c for c in result.checks if not c.passed]
    note = next((e.error for e in result.exchanges if e.error), None)
    title = escape(f"{result.scenario_id} {result.title}")
    if result.error:
        console.print(f"[red]ERROR[/] {title}: {escape(result.error)}")
    elif failed:
        console.print(f"[red]FAIL[/] {title}: " + ", ".join(c.check_id for c in failed))
    else:
        console.print(f"[green]pass[/] {title} ({len(result.checks)} checks)")
    if note:
        console.print(f"     {note}", markup=False)


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM while the block runs (installed before anything is announced, so a
    signal never interrupts the simulator half-way through starting or stopping)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def register(group: typer.Typer, load: Loader) -> None:
    """Add ``simulate`` to the ``conformance`` command group."""

    @group.command("simulate")
    def simulate(
        config: Annotated[Path, typer.Option("--config", "-c", help="XIG configuration: identity, listen address, "
                                                                    "TLS certificates and SAML trust.")],
        fixture: Annotated[Path, typer.Option("--fixture", help="patients, studies and faults (TOML or JSON).")],
        fault: Annotated[list[str] | None, typer.Option(
            "--fault", help="inject a fault: TRANSACTION:KIND[=VALUE][,times=N], e.g. ITI-38:delay=1500, "
                            "ITI-55:soap-fault, ITI-38:registry-error=XDSRegistryBusy, RAD-75:partial=2, "
                            "RAD-75:broken-mtom=truncate (repeatable)")] = None,
        report_dir: Annotated[Path, typer.Option(
            "--report-dir", help="where the JSON, JUnit XML and HTML reports go.")] = Path("conformance-report"),
        duration: Annotated[float | None, typer.Option("--for", min=0.1, help="stop after SECONDS (default: "
                                                                              "until Ctrl-C).")] = None,
        work_dir: Annotated[Path | None, typer.Option(
            "--work-dir", help="keep the generated PACS and database here, reused by later runs of the same "
                               "fixture (default: a temporary folder).")] = None,
    ) -> None:
        """Run a simulated responding community; judge every request an initiating gateway sends it."""
        cfg = load(config)
        fx, faults = _fixture(fixture, fault or [])
        work = work_dir or Path(tempfile.mkdtemp(prefix="xig-simulate-"))
        try:
            code = _run(cfg, fx, faults, work, report_dir, duration)
        finally:
            if work_dir is None:
                shutil.rmtree(work, ignore_errors=True)
        raise typer.Exit(code)


def _run(cfg: Config, fixture: Fixture, faults: list[FaultSpec], work: Path, report_dir: Path,
         duration: float | None) -> int:
    with _stop_signals() as stop:
        sim = Simulator(cfg, fixture, work, faults=faults, on_result=_print_result)
        try:
            sim.start()
        except (ConfigError, OSError, RuntimeError) as exc:
            err.print(f"[bold red]the simulator could not start:[/] {escape(str(exc))}")
            return 1
        try:
            studies = sum(len(p.studies) for p in fixture.patients)
            console.print(f"simulated community {cfg.gateway.home_community_id}: {len(fixture.patients)} "
                          f"patient(s), {studies} study(ies), {fixture.instance_count} instance(s)", markup=False)
            for transaction, url in sim.endpoints.items():
                console.print(f"  {transaction:7} {url}", markup=False)
            for f in sim.plan.faults:
                console.print(f"  fault: {f.describe()}", markup=False)
            until = f"for {duration:g} s" if duration is not None else "until Ctrl-C"
            console.print(f"judging every request {until}", markup=False)
            stop.wait(duration)
        finally:
            sim.stop()
        results = sim.results
        files = sim.write_report(report_dir)
    for line in format_summary(results):
        console.print(line, markup=False)
    console.print(f"reports: {files.json} {files.junit} {files.html}", markup=False)
    return 0 if summarize(results).passed else 1


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _usage_error(exc.source, exc.problems) from None


def main() -> None:
    """Run the command on its own: ``python -m conformance.simulator.cli simulate ...``."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)

    @app.callback()
    def _group() -> None:
        """XIG conformance simulator."""

    register(app, _load)
    app()


if __name__ == "__main__":
    main()


__all__ = ["register"]
