"""A self-contained HTML report: inline CSS, no script, no external asset; every partner-supplied text escaped.

One page per run: who was tested, the totals, then one section per scenario — its checks (with the clause
each enforces) and the raw request/response pairs (XML re-indented, binary MIME parts summarised) so a
failure can be shown to the partner's engineers as it is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from conformance.model import Exchange, ScenarioResult
from conformance.report.display import render
from gateway.files import atomic_write

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem;color:#1d232a;background:#fafbfc}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.1rem;margin:0}
table{border-collapse:collapse;width:100%;margin:.5rem 0}
th,td{border:1px solid #d7dde3;padding:.3rem .5rem;text-align:left;vertical-align:top;font-size:.9rem}
th{background:#eef1f4}
.meta td:first-child{width:14rem;font-weight:600}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:.8rem;font-size:.8rem;font-weight:700;color:#fff}
.passed{background:#1f883d}.failed{background:#cf222e}.error{background:#9a6700}
section{background:#fff;border:1px solid #d7dde3;border-radius:.4rem;margin:1rem 0;padding:.6rem 1rem}
summary{cursor:pointer}
.fail td{background:#fff1f0}.spec{color:#57606a;font-size:.85rem}
pre{background:#f6f8fa;border:1px solid #d7dde3;padding:.5rem;overflow:auto;max-height:30rem;font-size:.8rem;
white-space:pre-wrap;word-break:break-all}
.totals span{margin-right:1rem}
"""


def _badge(status: str) -> str:
    return f'<span class="badge {escape(status)}">{escape(status.upper())}</span>'


def _headers(headers: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in headers)


def _exchange(index: int, ex: Exchange) -> str:
    status = f"HTTP {ex.status}" if ex.status is not None else "no response"
    error = f" — {ex.error}" if ex.error else ""
    request = f"POST {ex.url}\n{_headers(ex.request_headers)}\n\n{render(ex.request_headers, ex.request_body)}"
    if ex.status is None:
        response = ex.error or "no response"
    else:
        response = (f"HTTP {ex.status}\n{_headers(ex.response_headers)}\n\n"
                    f"{render(ex.response_headers, ex.response_body, ex.truncated)}")
    return (f"<details><summary>#{index} {escape(ex.transaction)} → {escape(ex.url)}: {escape(status)}"
            f"{escape(error)} ({ex.elapsed_ms:.0f} ms)</summary>"
            f"<h3>Request</h3><pre>{escape(request)}</pre><h3>Response</h3><pre>{escape(response)}</pre></details>")


def _scenario(r: ScenarioResult) -> str:
    rows = []
    for c in r.checks:
        rows.append(f'<tr class="{"" if c.passed else "fail"}"><td>{_badge("passed" if c.passed else "failed")}</td>'
                    f"<td><code>{escape(c.check_id)}</code></td><td>{escape(c.title)}</td>"
                    f'<td class="spec">{escape(c.spec)}</td><td>{escape(c.detail)}</td></tr>')
    table = ("<table><tr><th>Result</th><th>Check</th><th>Rule</th><th>Clause</th><th>Detail</th></tr>"
             + "".join(rows) + "</table>") if rows else "<p>No check was made.</p>"
    error = f"<p><strong>Could not run to the end:</strong> {escape(r.error)}</p>" if r.error else ""
    exchanges = "".join(_exchange(i, ex) for i, ex in enumerate(r.exchanges, 1))
    ex_block = f"<details><summary>{len(r.exchanges)} exchange(s)</summary>{exchanges}</details>" if exchanges else ""
    is_open = "" if r.status == "passed" else " open"
    failed = sum(1 for c in r.checks if not c.passed)
    return (f'<section id="{escape(r.scenario_id)}"><details{is_open}><summary><h2>{_badge(r.status)} '
            f"<code>{escape(r.scenario_id)}</code> {escape(r.title)}</h2></summary>"
            f'<p class="spec">{escape(r.spec)} — {len(r.checks)} checks, {failed} failed, '
            f"{r.elapsed_ms / 1000:.2f} s</p>{error}{table}{ex_block}</details></section>")


def render_html(results: Sequence[ScenarioResult], *, title: str, properties: Mapping[str, str] | None = None,
                generated: dt.datetime | None = None) -> str:
    counts = {"passed": 0, "failed": 0, "error": 0}
    for r in results:
        counts[r.status] += 1
    overall = "passed" if results and counts["passed"] == len(results) else "failed"
    meta = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in (properties or {}).items())
    when = (generated or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    index = "".join(f'<tr><td>{_badge(r.status)}</td><td><a href="#{escape(r.scenario_id)}"><code>'
                    f"{escape(r.scenario_id)}</code></a></td><td>{escape(r.title)}</td>"
                    f'<td class="spec">{escape(r.spec)}</td></tr>' for r in results)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)} {_badge(overall)}</h1><p class=\"spec\">generated {escape(when)}</p>"
        f'<table class="meta">{meta}</table>'
        f'<p class="totals"><span>{len(results)} scenario(s)</span><span>{counts["passed"]} passed</span>'
        f'<span>{counts["failed"]} failed</span><span>{counts["error"]} could not run</span></p>'
        f"<table><tr><th>Result</th><th>Scenario</th><th>Title</th><th>Clauses</th></tr>{index}</table>"
        + "".join(_scenario(r) for r in results)
        + "</body></html>\n"
    )


def write_html(path: Path, results: Sequence[ScenarioResult], *, title: str,
               properties: Mapping[str, str] | None = None, generated: dt.datetime | None = None) -> None:
    """Write :func:`render_html` to ``path`` atomically."""
    data = render_html(results, title=title, properties=properties, generated=generated).encode("utf-8")
    with atomic_write(path) as f:
        f.write(data)


__all__ = ["render_html", "write_html"]
