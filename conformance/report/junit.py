"""JUnit XML: one testcase per scenario; a failure lists the failed checks with the clauses they enforce.

The layout is the common denominator CI servers read (Jenkins, GitLab, GitHub actions): ``testsuites`` /
``testsuite`` with ``properties`` / ``testcase`` with ``failure`` (a judged failure) or ``error`` (the
scenario could not be judged) and ``system-out`` listing every check.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path

from lxml import etree

from conformance.model import Check, ScenarioResult
from gateway.files import atomic_write


def check_line(c: Check) -> str:
    state = "PASS" if c.passed else "FAIL"
    detail = f": {c.detail}" if c.detail else ""
    return f"{state} [{c.check_id}] {c.title} ({c.spec}){detail}"


def _seconds(ms: float) -> str:
    return f"{ms / 1000.0:.3f}"


def _clean(text: str) -> str:
    """XML 1.0 cannot carry most control characters; a partner's reason text might contain them."""
    return "".join(ch if ch in "\t\n\r" or ord(ch) >= 0x20 else f"\\x{ord(ch):02x}" for ch in text)


def build_junit(results: Sequence[ScenarioResult], *, suite: str, properties: Mapping[str, str] | None = None,
                groups: Mapping[str, str] | None = None, timestamp: dt.datetime | None = None) -> etree._Element:
    """The ``testsuites`` element; ``groups`` maps scenario ids to a class name part (e.g. ``XCPD``)."""
    failures = sum(1 for r in results if r.status == "failed")
    errors = sum(1 for r in results if r.status == "error")
    total_ms = sum(r.elapsed_ms for r in results)
    root = etree.Element("testsuites", name=_clean(suite), tests=str(len(results)), failures=str(failures),
                         errors=str(errors), time=_seconds(total_ms))
    ts = etree.SubElement(root, "testsuite", name=_clean(suite), tests=str(len(results)), failures=str(failures),
                          errors=str(errors), skipped="0", time=_seconds(total_ms),
                          timestamp=(timestamp or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%S"))
    props = etree.SubElement(ts, "properties")
    for name, value in (properties or {}).items():
        etree.SubElement(props, "property", name=_clean(name), value=_clean(str(value)))
    for r in results:
        group = (groups or {}).get(r.scenario_id, "")
        classname = "conformance" + (f".{group}" if group else "")
        case = etree.SubElement(ts, "testcase", classname=_clean(classname), name=_clean(r.scenario_id),
                                time=_seconds(r.elapsed_ms))
        failed = [c for c in r.checks if not c.passed]
        if r.status == "error":
            el = etree.SubElement(case, "error", message=_clean(r.error or "the scenario could not run"),
                                  type="ScenarioError")
            el.text = _clean("\n".join([r.error or "", *(check_line(c) for c in failed)]))
        elif r.status == "failed":
            message = (f"{len(failed)} of {len(r.checks)} checks failed: "
                       + ", ".join(c.check_id for c in failed)) if failed else "no check was made"
            el = etree.SubElement(case, "failure", message=_clean(message), type="ConformanceFailure")
            el.text = _clean("\n".join(check_line(c) for c in failed))
        out = etree.SubElement(case, "system-out")
        out.text = _clean("\n".join([f"{r.title} ({r.spec})", *(check_line(c) for c in r.checks)]))
    return root


def write_junit(path: Path, results: Sequence[ScenarioResult], *, suite: str,
                properties: Mapping[str, str] | None = None, groups: Mapping[str, str] | None = None,
                timestamp: dt.datetime | None = None) -> None:
    """Write :func:`build_junit` to ``path`` atomically (all or nothing)."""
    root = build_junit(results, suite=suite, properties=properties, groups=groups, timestamp=timestamp)
    data = etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
    with atomic_write(path) as f:
        f.write(data)


__all__ = ["build_junit", "check_line", "write_junit"]
