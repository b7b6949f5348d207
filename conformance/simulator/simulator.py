"""The simulated responding community as one object: seed, serve, judge, inject faults, report.

::

    with Simulator(config, load_fixture("fixture.toml"), work_dir) as sim:
        ...  # point an initiating gateway at sim.endpoints
        sim.recorder.results     # one ScenarioResult per request, judged before it was answered
    sim.write_report(report_dir)

The gateway is XIG's real responding gateway (:class:`~gateway.web.server.BackgroundServer` with the
responding services over the fixture's embedded PACS); its transaction handlers are wrapped for the
handler-level faults and its ASGI app gets the :class:`~conformance.simulator.recorder.SimulatorMiddleware`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

from conformance.model import ScenarioResult
from conformance.simulator.community import Truth, seed, simulated_config
from conformance.simulator.faults import FaultPlan, FaultSpec, with_faults
from conformance.simulator.fixture import Fixture
from conformance.simulator.judge import Judge
from conformance.simulator.recorder import Recorder, SimulatorMiddleware
from conformance.simulator.report import ReportFiles, write_report
from gateway.config import Config
from gateway.responding.assembly import RespondingServices
from gateway.web.endpoints import ENDPOINTS
from gateway.web.handlers import responding_handlers
from gateway.web.server import BackgroundServer


class Simulator:
    def __init__(self, config: Config, fixture: Fixture, work_dir: Path, *, faults: Sequence[FaultSpec] = (),
                 on_result: Callable[[ScenarioResult], None] | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.fixture = fixture
        self.config = simulated_config(config, fixture, self.work_dir)
        self.plan = FaultPlan([*fixture.faults, *faults])
        self.recorder = Recorder(on_result)
        self.truth: Truth | None = None
        self._services: RespondingServices | None = None
        self._server: BackgroundServer | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Simulator:
        """Seed the PACS from the fixture and start serving; returns once connections are accepted."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        services = self._services = RespondingServices.open(self.config)
        try:
            truth = self.truth = seed(services, self.fixture, self.work_dir)
            hcid = self.config.gateway.home_community_id
            handlers = {t: with_faults(t, h, hcid) for t, h in responding_handlers(services).items()}
            server = BackgroundServer(self.config, handlers)
            server.app.add_middleware(SimulatorMiddleware, judge=Judge(self.config, truth, services.ledger),
                                      recorder=self.recorder, plan=self.plan,
                                      max_body=self.config.server.max_request_bytes)
            self._server = server.start(timeout)
        except BaseException:
            self._close_services()
            raise
        return self

    def stop(self) -> None:
        try:
            if self._server is not None:
                self._server.stop()
                self._server = None
        finally:
            self._close_services()

    def _close_services(self) -> None:
        services, self._services = self._services, None
        if services is not None:  # embedded PACS: nothing bound to the serving loop
            anyio.run(services.aclose)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- where and what ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the simulator is not running")
        return self._server.url

    @property
    def endpoints(self) -> dict[str, str]:
        """Transaction → URL, e.g. ``{"ITI-55": "https://127.0.0.1:8443/ihe/xcpd", ...}``."""
        return {e.transaction: self.url + e.path for e in ENDPOINTS}

    @property
    def results(self) -> list[ScenarioResult]:
        return self.recorder.results

    def write_report(self, directory: Path) -> ReportFiles:
        """JSON and JUnit XML of every judged request so far (see :mod:`conformance.simulator.report`)."""
        return write_report(self.results, directory, community=self.config.gateway.home_community_id,
                            faults=[f.describe() for f in self.plan.faults])


__all__ = ["Simulator"]
