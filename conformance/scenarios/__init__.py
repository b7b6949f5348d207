"""Every scenario of the initiator role, in run order (prerequisites first)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from conformance.context import Scenario
from conformance.scenarios import errors, rad75, security, xca, xcpd

SCENARIOS: tuple[Scenario, ...] = (*xcpd.SCENARIOS, *xca.SCENARIOS, *rad75.SCENARIOS, *errors.SCENARIOS,
                                   *security.SCENARIOS)
BY_ID = {s.scenario_id: s for s in SCENARIOS}


class UnknownScenario(ValueError):
    """A ``--scenario`` names nothing."""


def select(patterns: Sequence[str] = ()) -> list[Scenario]:
    """The scenarios named by ``patterns`` (ids or shell patterns such as ``rad75-*``), in run order; all when
    none is given. Raises :class:`UnknownScenario` for a pattern that matches nothing."""
    if not patterns:
        return list(SCENARIOS)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {s.scenario_id for s in SCENARIOS if fnmatch.fnmatchcase(s.scenario_id, pattern.strip())}
        if not hits:
            raise UnknownScenario(f"no scenario matches {pattern!r}; `xig conformance list` shows them "
                                  f"({', '.join(BY_ID)})")
        chosen |= hits
    return [s for s in SCENARIOS if s.scenario_id in chosen]


__all__ = ["BY_ID", "SCENARIOS", "UnknownScenario", "select"]
