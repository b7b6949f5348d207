"""Small helpers every check module uses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from conformance.model import Check
from gateway.errors import SoapFault


def check(check_id: str, family: str, title: str, spec: str, passed: bool, detail: str = "") -> Check:
    return Check(check_id=check_id, family=family, title=title, spec=spec, passed=bool(passed), detail=detail)


def listing(items: Sequence[str], limit: int = 4) -> str:
    """``a, b, c and 2 more`` (for details naming offending items)."""
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def merge(groups: Iterable[tuple[str, Sequence[Check]]]) -> list[Check]:
    """One check per check id over several subjects (``(label, checks)`` pairs, e.g. one per exchange or
    document): passed when every subject passed; the detail names the subjects that did not and why (or,
    when all passed, joins what each said)."""
    order: list[str] = []
    first: dict[str, Check] = {}
    failed: dict[str, list[str]] = {}
    passed: dict[str, list[str]] = {}
    for label, checks in groups:
        for c in checks:
            if c.check_id not in first:
                order.append(c.check_id)
                first[c.check_id] = c
                failed[c.check_id], passed[c.check_id] = [], []
            if c.passed:
                passed[c.check_id].append(f"{label}: {c.detail}" if label and c.detail else c.detail)
            else:
                failed[c.check_id].append(f"{label}: {c.detail}" if label and c.detail else (label or c.detail
                                                                                                or "failed"))
    out: list[Check] = []
    for cid in order:
        c, bad = first[cid], failed[cid]
        detail = "; ".join(t for t in (bad or passed[cid]) if t)
        out.append(check(cid, c.family, c.title, c.spec, not bad, detail))
    return out


def describe_fault(fault: SoapFault) -> str:
    code = f"{fault.code}/{fault.subcode}" if fault.subcode is not None else fault.code
    detail = f" [{fault.detail}]" if fault.detail else ""
    return f"SOAP fault {code}: {fault.reason or '(no reason given)'}{detail}"
