"""Results of a conformance run: checks inside scenarios, each citing the clause it enforces.

Shared by the initiator role (``xig conformance run``: we play the partner's counterpart and judge a
responding gateway) and the responder role (``xig conformance simulate``: a simulated community judges
the requests an initiating gateway sends it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Status = Literal["passed", "failed", "error"]


@dataclass(frozen=True)
class Check:
    """One judged rule. ``spec`` cites the clause, e.g. ``"RAD TF-3 4.68.4.1.2.3.2"`` or ``"ITI TF-2 3.55.4.2.3"``."""

    check_id: str  #: stable id, e.g. "iti38.metadata.formatCode"
    family: str  #: e.g. "soap", "xsd", "metadata", "kos", "rad75", "security", "xcpd"
    title: str
    spec: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class Exchange:
    """One raw request/response pair, kept so a failure can be shown to the partner's engineers."""

    transaction: str  #: "ITI-55", "ITI-38", "ITI-39", "RAD-75"
    url: str
    request_headers: tuple[tuple[str, str], ...]
    request_body: bytes
    status: int | None
    response_headers: tuple[tuple[str, str], ...]
    response_body: bytes  #: may be truncated for large MTOM responses (see ``truncated``)
    truncated: bool = False
    elapsed_ms: float = 0.0
    error: str | None = None  #: transport error, when no response arrived


@dataclass
class ScenarioResult:
    scenario_id: str
    title: str
    spec: str
    checks: list[Check] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    error: str | None = None  #: the scenario could not run to the end (not a judged failure)
    elapsed_ms: float = 0.0

    @property
    def status(self) -> Status:
        if self.error is not None:
            return "error"
        return "passed" if self.checks and all(c.passed for c in self.checks) else "failed"
