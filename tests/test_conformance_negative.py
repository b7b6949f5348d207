"""Every check family can fail: the suite against responders with one thing deliberately broken.

Each case starts a real XIG responding gateway (mutual TLS, real Orthanc) with a single fault — a handler
whose answer is spoiled, a middleware that rewrites the SOAP framing on the wire, a front end that accepts
any assertion — runs the scenarios that exercise it, and requires the right diagnosis: the scenario fails
(it is judged, not aborted), the expected check fails citing the clause it enforces, and nothing outside
the expected families is blamed. A check family without such a case could never fail unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conformance import runner
from conformance.checks import FAMILIES
from conformance.scenarios import select
from conformance.target import load_target
from gateway.config import Config, load_config
from gateway.security.certs import CertSet
from tests.conformance_fixtures import (
    ASGIApp,
    accept_any_assertion,
    drop_relates_to,
    responder_config,
    rewrite_action,
    runner_config,
    seed,
    start_responder,
)
from tests.orthanc import OrthancServer


@dataclass(frozen=True)
class Case:
    name: str
    scenarios: tuple[str, ...]
    #: check id → a clause its spec must cite
    failing: dict[str, str]
    #: families allowed to fail besides those of ``failing`` (knock-on effects of the same fault)
    also: frozenset[str] = frozenset()
    breakage: str | None = None
    middleware: Callable[[Config], Callable[[ASGIApp], ASGIApp]] | None = None


CASES = [
    Case("wrong-response-action", ("iti38-find-leafclass",), {"soap.action": "ITI TF-2 3.38.5"},
         middleware=lambda cfg: rewrite_action),
    Case("no-relates-to", ("xcpd-match",), {"soap.relates-to": "WS-Addressing 1.0 Core 3.4"},
         middleware=lambda cfg: drop_relates_to),
    Case("schema-invalid-response", ("iti38-find-leafclass",), {"xsd.valid": "query.xsd"},
         breakage="schema-invalid-query-response"),
    Case("xcpd-case-contradiction", ("xcpd-match",), {"xcpd.case-codes": "ITI TF-2 3.55.4.2.3"},
         breakage="xcpd-case-contradiction"),
    Case("objectref-without-home", ("iti38-find-objectref",), {"iti38.home": "ITI TF-2 3.38.4.1.3"},
         breakage="drop-home"),
    Case("no-format-code", ("iti38-find-leafclass",), {"metadata.format-code": "RAD TF-3 4.68.4.1.2.3.2"},
         breakage="drop-format-code"),
    Case("no-new-document-unique-id", ("iti39-retrieve-kos",), {"iti39.on-demand": "ITI TF-2 3.43.4.2.3"},
         also=frozenset({"kos"}), breakage="drop-new-document-id"),
    Case("unreadable-kos", ("iti39-retrieve-kos",), {"kos.readable": "DICOM PS3.3 A.35.4"}, breakage="garbage-kos"),
    Case("kos-fails-dciodvfy", ("iti39-retrieve-kos",), {"kos.dciodvfy": "DICOM PS3.3 A.35.4"},
         breakage="kos-missing-type1"),
    Case("corrupted-instance", ("rad75-single-series",), {"rad75.dicom": "DICOM PS3.10"},
         breakage="corrupt-instance"),
    Case("transfer-syntax-ignored", ("rad75-transfer-syntax",), {"rad75.transfer-syntax": "RAD69-005"},
         breakage="ignore-transfer-syntax"),
    Case("retrieve-errors-swallowed", ("error-unknown-document",),
         {"registry.error-code": "ITI TF-2 3.39.4.1.3", "registry.error-status": "ITI TF-3 4.2.4.2"},
         breakage="silent-retrieve-errors"),
    Case("any-assertion-accepted", ("security-*",), {"security.fault": "ITI TF-2 3.40.4.1.3"},
         middleware=accept_any_assertion),
]


@pytest.fixture(scope="module")
def seeded(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> OrthancServer:
    seed(orthanc, tmp_path_factory.mktemp("conformance-negative-data"))
    return orthanc


def test_every_check_family_has_a_negative_case() -> None:
    covered = {check_id.split(".", 1)[0] for case in CASES for check_id in case.failing}
    assert covered == FAMILIES


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_broken_responder_is_diagnosed(case: Case, seeded: OrthancServer, pki: CertSet, tmp_path: Path) -> None:
    config = responder_config(tmp_path / "responder", pki, seeded)
    server = start_responder(config, breakage=case.breakage,
                             middleware=case.middleware(config) if case.middleware is not None else None)
    try:
        target = load_target(load_config(runner_config(tmp_path / "runner", pki, server)))
        report = await runner.run(target, select(case.scenarios))
    finally:
        server.stop()
    assert report.results and not report.passed
    allowed = {cid.split(".", 1)[0] for cid in case.failing} | case.also
    for result in report.results:
        assert result.status == "failed", (result.scenario_id, result.error)  # judged, not aborted
        failed = {c.check_id: c for c in result.checks if not c.passed}
        for check_id, clause in case.failing.items():
            assert check_id in failed, (result.scenario_id, sorted(failed))
            assert clause in failed[check_id].spec, failed[check_id]
            assert failed[check_id].detail, failed[check_id]  # says what was wrong
        assert {c.family for c in failed.values()} <= allowed, (result.scenario_id, sorted(failed))
        assert any(c.passed for c in result.checks)  # the rest of the answer was still judged
