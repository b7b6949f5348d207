"""The simulator's report: every judged request as JSON and as JUnit XML, and a summary for the console.

Files (written atomically into the report directory):

``simulate-report.json``
    ``summary`` (requests, checks, failures per transaction), then ``requests``: one object per
    received request — scenario id, title, clause, status, every check with its clause and detail, and
    the raw exchange (headers; bodies up to 64 KiB, UTF-8 text or base64).
``simulate-junit.xml``, ``simulate-report.html``
    Written with the initiator role's writers (:mod:`conformance.report.junit`, :mod:`conformance.report.html`):
    one testcase per received request (``classname`` ``conformance.<transaction>``, ``name`` its scenario
    id), a ``failure`` listing the failed checks with the clauses they enforce, every check in
    ``system-out``; the HTML page shows each request with its checks and raw exchange.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import gateway
from conformance.model import Exchange, ScenarioResult
from conformance.report.html import write_html
from conformance.report.junit import write_junit
from gateway.files import atomic_write

SUITE: Final = "xig conformance simulate"
JSON_NAME: Final = "simulate-report.json"
JUNIT_NAME: Final = "simulate-junit.xml"
HTML_NAME: Final = "simulate-report.html"
MAX_BODY_IN_REPORT: Final = 64 * 1024


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    junit: Path
    html: Path


@dataclass(frozen=True)
class Summary:
    requests: int
    failed_requests: int
    checks: int
    failed_checks: int
    by_transaction: dict[str, tuple[int, int]]  #: transaction → (requests, failed requests)

    @property
    def passed(self) -> bool:
        return self.requests > 0 and self.failed_requests == 0


def summarize(results: Sequence[ScenarioResult]) -> Summary:
    by: dict[str, list[int]] = {}
    for r in results:
        counts = by.setdefault(r.scenario_id.split("#", 1)[0], [0, 0])
        counts[0] += 1
        counts[1] += r.status != "passed"
    return Summary(len(results), sum(1 for r in results if r.status != "passed"),
                   sum(len(r.checks) for r in results), sum(1 for r in results for c in r.checks if not c.passed),
                   {t: (n, f) for t, (n, f) in by.items()})


def format_summary(results: Sequence[ScenarioResult]) -> list[str]:
    """Console lines: one per transaction, then one per failed check (id, clause, detail)."""
    s = summarize(results)
    if not s.requests:
        return ["no requests were received"]
    lines = [f"{s.requests} request(s) judged, {s.failed_requests} with failed checks "
             f"({s.failed_checks} of {s.checks} checks failed)"]
    lines += [f"  {t}: {n} request(s), {f} failed" for t, (n, f) in s.by_transaction.items()]
    failures = Counter((c.check_id, c.spec) for r in results for c in r.checks if not c.passed)
    for r in results:
        for c in r.checks:
            if not c.passed:
                lines.append(f"  FAIL {r.scenario_id} {c.check_id} [{c.spec}]: {c.detail}")
    if failures:
        lines.append("failed rules: " + ", ".join(f"{cid} ×{n}" for (cid, _), n in failures.most_common()))
    return lines


def _body(data: bytes) -> dict[str, Any]:
    cut = data[:MAX_BODY_IN_REPORT]
    try:
        return {"text": cut.decode("utf-8"), "truncated": len(data) > len(cut)}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(cut).decode("ascii"), "truncated": len(data) > len(cut)}


def _exchange(e: Exchange) -> dict[str, Any]:
    return {"transaction": e.transaction, "url": e.url, "request_headers": [list(h) for h in e.request_headers],
            "request_body": _body(e.request_body), "status": e.status,
            "response_headers": [list(h) for h in e.response_headers],
            "response_body": {**_body(e.response_body), "truncated": e.truncated or len(e.response_body)
                              > MAX_BODY_IN_REPORT},
            "elapsed_ms": round(e.elapsed_ms, 1), "error": e.error}


def report_document(results: Sequence[ScenarioResult], *, community: str, faults: Sequence[str] = ()) -> dict[str, Any]:
    s = summarize(results)
    return {
        "tool": SUITE, "version": gateway.__version__,
        "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "community": community,
        "faults": list(faults),
        "summary": {"requests": s.requests, "failed_requests": s.failed_requests, "checks": s.checks,
                    "failed_checks": s.failed_checks,
                    "by_transaction": {t: {"requests": n, "failed": f} for t, (n, f) in s.by_transaction.items()}},
        "requests": [{
            "scenario_id": r.scenario_id, "title": r.title, "spec": r.spec, "status": r.status,
            "elapsed_ms": round(r.elapsed_ms, 1), "error": r.error,
            "checks": [{"check_id": c.check_id, "family": c.family, "title": c.title, "spec": c.spec,
                        "passed": c.passed, "detail": c.detail} for c in r.checks],
            "exchanges": [_exchange(e) for e in r.exchanges],
        } for r in results],
    }


def write_report(results: Sequence[ScenarioResult], directory: Path, *, community: str,
                 faults: Sequence[str] = ()) -> ReportFiles:
    """Write the three files into ``directory`` (created if needed), each all or nothing."""
    files = ReportFiles(directory / JSON_NAME, directory / JUNIT_NAME, directory / HTML_NAME)
    with atomic_write(files.json) as f:
        f.write(json.dumps(report_document(results, community=community, faults=faults), indent=2).encode("utf-8"))
    properties = {"role": "responder (simulated community judging an initiating gateway)", "community": community,
                  **{f"fault {i + 1}": text for i, text in enumerate(faults)}}
    groups = {r.scenario_id: r.scenario_id.split("#", 1)[0] for r in results}
    write_junit(files.junit, results, suite=SUITE, properties=properties, groups=groups)
    write_html(files.html, results, title=SUITE, properties=properties)
    return files


__all__ = ["HTML_NAME", "JSON_NAME", "JUNIT_NAME", "ReportFiles", "Summary", "format_summary", "report_document",
           "summarize", "write_report"]
