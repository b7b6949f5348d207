"""``xig conformance ...``: the conformance suite.

``xig conformance list`` shows the scenarios and the clauses they enforce. ``xig conformance run`` plays the
initiating partner against a responding gateway and judges every answer; ``--config FILE [--partner NAME]``
takes our identity from an XIG configuration and the gateway under test from its ``[[partners]]``, the test
patient from ``[conformance]``. ``--partner FILE`` alone names a partner setup, which is such a configuration
with a single ``[[partners]]`` entry. It prints each scenario's result as it finishes and writes JUnit XML
(``--junit``), a self-contained HTML report (``--report``) and the raw request/response pairs (``--exchanges``,
by default beside the report); with none of these, all three go to ``--out DIR`` (default
``./xig-conformance-<time>``). Exit status: 0 when every selected scenario passed, 1 when one failed or could
not run, 2 for usage or configuration errors.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.config import Config
from gateway.web import loop as event_loop

if TYPE_CHECKING:
    from conformance.target import Target

console = Console()
err = Console(stderr=True, soft_wrap=True)

Loader = Callable[[Path], Config]

_STYLE = {"passed": "[bold green]PASS[/]", "failed": "[bold red]FAIL[/]", "error": "[bold yellow]ERROR[/]"}


def _usage(message: str) -> NoReturn:
    err.print(f"[bold red]error[/] {escape(message)}")
    raise typer.Exit(2)


def _list(as_json: bool) -> None:
    from conformance.scenarios import SCENARIOS

    if as_json:
        print(json.dumps([{"id": s.scenario_id, "group": s.group, "title": s.title, "spec": s.spec,
                           "transactions": list(s.transactions), "description": s.description}
                          for s in SCENARIOS], indent=2))
        return
    table = Table("Scenario", "What it checks", "Clauses", "Needs", title="XIG conformance scenarios "
                  "(initiator role: testing a responding gateway)")
    for s in SCENARIOS:
        table.add_row(s.scenario_id, escape(s.title), escape(s.spec), ", ".join(s.transactions))
    console.print(table)
    console.print("[dim]`xig conformance list --json` adds a description of each scenario.[/]")


def _target(load: Loader, config: Path | None, partner: str | None) -> Target:
    from conformance.target import SetupError, load_target

    if config is None:
        if partner is None:
            _usage("give --config FILE [--partner NAME], or --partner FILE (a partner setup: an XIG configuration "
                   "whose single [[partners]] entry is the gateway under test)")
        path = Path(partner)
        if not path.is_file():
            _usage(f"without --config, --partner names a partner-setup file (an XIG configuration); "
                   f"{partner!r} is not a file")
        cfg, name = load(path), None
    else:
        cfg, name = load(config), partner
    try:
        return load_target(cfg, name)
    except SetupError as exc:
        _usage(str(exc))


def _check_outputs(junit: Path | None, report: Path | None, exchanges: Path | None) -> None:
    for label, path in (("--junit", junit), ("--report", report)):
        if path is not None and path.is_dir():
            _usage(f"{label} {path} is a folder; give a file name")
    if exchanges is not None and exchanges.exists() and not (
            exchanges.is_dir() and ((exchanges / "index.json").is_file() or not any(exchanges.iterdir()))):
        _usage(f"--exchanges {exchanges} exists and is not an exchanges folder of an earlier run; choose another path")


def _run(load: Loader, config: Path | None, partner: str | None, scenario: list[str] | None, junit: Path | None,
         report: Path | None, exchanges: Path | None, out: Path | None) -> int:
    from conformance import runner
    from conformance.context import Scenario
    from conformance.model import ScenarioResult
    from conformance.report.exchanges import write_exchanges
    from conformance.report.html import write_html
    from conformance.report.junit import write_junit
    from conformance.scenarios import UnknownScenario, select
    from conformance.target import SetupError

    try:
        chosen = select(scenario or [])
    except UnknownScenario as exc:
        _usage(str(exc))
    target = _target(load, config, partner)
    if out is None and junit is None and report is None and exchanges is None:
        out = Path(f"xig-conformance-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}")
    if out is not None:
        junit = junit or out / "results.xml"
        report = report or out / "report.html"
        exchanges = exchanges or out / "exchanges"
    if exchanges is None and (report or junit) is not None:
        base = report or junit
        assert base is not None
        exchanges = base.with_name(f"{base.stem}-exchanges")
    _check_outputs(junit, report, exchanges)

    p = target.partner
    console.print(f"[bold]XIG conformance[/] — testing [bold]{escape(p.describe())}[/] as "
                  f"{escape(target.config.gateway.home_community_id)}; test patient {escape(target.patient.describe())}"
                  f"; {len(chosen)} scenario(s)")
    status = console.status("starting")

    def started(s: Scenario) -> None:
        status.update(f"{s.scenario_id}: {s.title}")

    def finished(s: Scenario, r: ScenarioResult) -> None:
        failed = [c for c in r.checks if not c.passed]
        console.print(f"{_STYLE[r.status]} {escape(r.scenario_id):<28} {escape(r.title)} "
                      f"[dim]({len(r.checks)} checks, {r.elapsed_ms / 1000:.2f} s)[/]")
        for c in failed:
            detail = f" — {escape(c.detail)}" if c.detail else ""
            console.print(f"     [red]✗[/] {escape(c.check_id)}: {escape(c.title)} [dim]({escape(c.spec)})[/]{detail}")
        if r.error:
            console.print(f"     [yellow]could not run to the end:[/] {escape(r.error)}")

    try:
        with status:
            result = event_loop.run(runner.run(target, chosen, on_start=started, on_result=finished),
                                    target.config.server.event_loop)
    except SetupError as exc:
        _usage(str(exc))
    counts = result.counts()
    props = {"partner": p.describe(), "partner homeCommunityId": p.home_community_id,
             **{f"{t} endpoint": u for t, u in result.endpoints.items()},
             "tested as (our homeCommunityId)": result.our_home_community_id, "test patient": result.test_patient,
             "started": result.started.isoformat(timespec="seconds"),
             "finished": result.finished.isoformat(timespec="seconds") if result.finished else "",
             "XIG version": result.xig_version}
    groups = {s.scenario_id: s.group for s in chosen}
    title = f"XIG conformance: {p.describe()}"
    written = []
    try:
        if junit is not None:
            write_junit(junit, result.results, suite=title, properties=props, groups=groups, timestamp=result.started)
            written.append(f"JUnit XML {junit}")
        if report is not None:
            write_html(report, result.results, title=title, properties=props, generated=result.finished)
            written.append(f"HTML report {report}")
        if exchanges is not None:
            n = write_exchanges(exchanges, result.results)
            written.append(f"{n} raw exchanges in {exchanges}/")
    except OSError as exc:
        err.print(f"[bold red]error[/] cannot write the reports: {escape(str(exc))}")
        return 2
    verdict = "[bold green]PASSED[/]" if result.passed else "[bold red]NOT PASSED[/]"
    console.print(f"{verdict}: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} could not run"
                  + (f" — {'; '.join(written)}" if written else ""))
    return 0 if result.passed else 1


def register(app: typer.Typer, load: Loader) -> None:
    """Add the ``conformance`` command group to the main ``xig`` app (``load`` reads and checks a config)."""
    group = typer.Typer(no_args_is_help=True, help="Conformance suite: test a partner's gateway before go-live.")
    app.add_typer(group, name="conformance")

    @group.command("list")
    def list_scenarios(
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """Show the scenarios with the clauses they enforce."""
        _list(as_json)

    @group.command("run")
    def run(
        config: Annotated[Path | None, typer.Option("--config", "-c", help="XIG configuration: our identity, the "
                                                    "[[partners]] under test, the [conformance] test patient")] = None,
        partner: Annotated[str | None, typer.Option("--partner", help="with --config: the [[partners]] entry (name "
                                                    "or homeCommunityId); alone: a partner-setup file")] = None,
        scenario: Annotated[list[str] | None, typer.Option("--scenario", "-s", help="scenario id or pattern "
                                                           "(e.g. 'rad75-*'); repeatable; default all")] = None,
        junit: Annotated[Path | None, typer.Option("--junit", help="write JUnit XML here")] = None,
        report: Annotated[Path | None, typer.Option("--report", help="write the HTML report here")] = None,
        exchanges: Annotated[Path | None, typer.Option("--exchanges", help="folder for the raw request/response "
                                                       "pairs (default: beside the report)")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="folder for results.xml, report.html and exchanges/ "
                                                 "(default when no other output is named: "
                                                 "./xig-conformance-<time>)")] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log details (and runner errors)")] = False,
    ) -> None:
        """Test a responding gateway: XCPD, ITI-38, ITI-39, RAD-75, error flows and XUA (exit 0 only if all pass)."""
        if verbose:
            logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        raise typer.Exit(_run(load, config, partner, scenario, junit, report, exchanges, out))

    try:
        from conformance.simulator.cli import register as register_simulate
    except ModuleNotFoundError as exc:
        if exc.name not in ("conformance.simulator", "conformance.simulator.cli"):
            raise
    else:
        register_simulate(group, load)
