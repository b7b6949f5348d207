"""Run scenarios against a responding gateway, one after the other, and collect their results."""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gateway
from conformance.context import Scenario, ScenarioAbort, ScenarioContext
from conformance.model import ScenarioResult
from conformance.session import Session, open_session
from conformance.target import Target

log = logging.getLogger("xig.conformance")


@dataclass
class RunReport:
    """A whole run: who was tested, when, and every scenario's result."""

    partner: str
    partner_home_community_id: str
    endpoints: dict[str, str]
    our_home_community_id: str
    test_patient: str
    started: dt.datetime
    finished: dt.datetime | None = None
    results: list[ScenarioResult] = field(default_factory=list)
    xig_version: str = gateway.__version__

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.status == "passed" for r in self.results)

    def counts(self) -> dict[str, int]:
        out = {"passed": 0, "failed": 0, "error": 0}
        for r in self.results:
            out[r.status] += 1
        return out


def new_report(target: Target) -> RunReport:
    return RunReport(partner=target.partner.name, partner_home_community_id=target.partner.home_community_id,
                     endpoints=dict(target.partner.endpoints), our_home_community_id=
                     target.config.gateway.home_community_id, test_patient=target.patient.describe(),
                     started=dt.datetime.now(dt.UTC))


async def run_scenario(session: Session, scenario: Scenario) -> ScenarioResult:
    """Play one scenario; a missing endpoint, a failed prerequisite or a bug in the runner becomes the
    result's ``error`` (the scenario could not be judged), never an exception."""
    result = ScenarioResult(scenario.scenario_id, scenario.title, scenario.spec)
    ctx = ScenarioContext(session, result)
    start = time.perf_counter()
    missing = [t for t in scenario.transactions if session.url(t) is None]
    try:
        if missing:
            raise ScenarioAbort(f"the partner setup has no endpoint for {', '.join(missing)} "
                                f"(set it in the [[partners]] entry)")
        await scenario.run(ctx)
    except ScenarioAbort as exc:
        result.error = exc.reason
    except Exception as exc:  # noqa: BLE001 - one broken scenario must not stop the run
        log.debug("conformance scenario %s failed unexpectedly", scenario.scenario_id, exc_info=True)
        result.error = f"the conformance runner failed in this scenario: {type(exc).__name__}: {exc}"
    finally:
        ctx.finish()
        result.elapsed_ms = round((time.perf_counter() - start) * 1000.0, 1)
    return result


async def run(target: Target, scenarios: Sequence[Scenario], *, workdir: Path | None = None,
              on_start: Callable[[Scenario], None] | None = None,
              on_result: Callable[[Scenario, ScenarioResult], None] | None = None) -> RunReport:
    """Run ``scenarios`` in order against ``target``; ``on_start``/``on_result`` report progress."""
    report = new_report(target)
    with tempfile.TemporaryDirectory(prefix="xig-conformance-", dir=workdir) as tmp:
        session = await open_session(target, Path(tmp))
        try:
            for scenario in scenarios:
                if on_start is not None:
                    on_start(scenario)
                result = await run_scenario(session, scenario)
                report.results.append(result)
                if on_result is not None:
                    on_result(scenario, result)
        finally:
            await session.aclose()
    report.finished = dt.datetime.now(dt.UTC)
    return report


__all__ = ["RunReport", "new_report", "run", "run_scenario"]
