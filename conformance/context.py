"""What a scenario is and what it works with while it runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from lxml import etree

from conformance.checks.common import check, merge
from conformance.model import Check, ScenarioResult
from conformance.session import Sent, Session


class ScenarioAbort(Exception):  # noqa: N818 - a control-flow signal, reported as the scenario's error
    """The scenario cannot go on (a prerequisite failed, the partner setup lacks something)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Scenario:
    """One test the runner can play against a responding gateway."""

    scenario_id: str
    title: str
    #: the main clauses the scenario exercises (each check cites its own)
    spec: str
    #: endpoints it needs, its own transaction first (prerequisites included)
    transactions: tuple[str, ...]
    description: str
    run: Callable[[ScenarioContext], Awaitable[None]]
    group: str = ""


class ScenarioContext:
    """A running scenario: sends requests (recorded into its result) and collects checks."""

    def __init__(self, session: Session, result: ScenarioResult) -> None:
        self.session = session
        self.result = result
        self._groups: list[tuple[str, list[Check]]] = []

    @property
    def workdir(self) -> Path:
        path = self.session.workdir / self.result.scenario_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, checks: Iterable[Check], *, label: str = "") -> list[Check]:
        """Record checks; ``label`` names the subject (an exchange, a document) when a scenario judges the same
        rule several times — :meth:`finish` merges them into one check per id."""
        added = list(checks)
        self._groups.append((label, added))
        return added

    def check(self, check_id: str, family: str, title: str, spec: str, passed: bool, detail: str = "", *,
              label: str = "") -> bool:
        self.add([check(check_id, family, title, spec, passed, detail)], label=label)
        return passed

    def finish(self) -> None:
        """Put the checks, one per id (merged over subjects, first-seen order), into the result."""
        self.result.checks = merge(self._groups)

    async def send(self, transaction: str, body: etree._Element, **kwargs: Any) -> Sent:
        if self.session.url(transaction) is None:
            self.abort(f"the partner setup has no {transaction} endpoint")
        sent = await self.session.send(transaction, body, **kwargs)
        self.result.exchanges.append(sent.exchange)
        return sent

    def abort(self, reason: str) -> NoReturn:
        raise ScenarioAbort(reason)


__all__ = ["Scenario", "ScenarioAbort", "ScenarioContext"]
