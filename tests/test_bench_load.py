"""The load benchmark's machinery on a tiny load (no timing is asserted: the figures are the benchmark's job).

A real ``xig serve --workers 2`` on a real PostgreSQL with the embedded PACS: 10 concurrent ITI-55, each
with its own signed assertion, must all come back as the right patient's match, and 3 concurrent RAD-75
of a study must all be complete, byte for byte — concurrent requests spread over two worker processes
sharing one database give no errors.
"""

from __future__ import annotations

from pathlib import Path

from bench.load import measure


def test_tiny_load_has_no_errors(tmp_path: Path) -> None:
    report = measure(tmp_path, workers=2, iti55_clients=10, iti55_rounds=2, rad75_clients=3, patients=3,
                     instances=4, reference=False)
    assert report.database == "PostgreSQL"
    assert report.iti55.errors == [] and len(report.iti55.latencies) == 20
    assert report.health.errors == [] and len(report.health.latencies) == 20
    assert report.rad75.errors == [] and len(report.rad75.latencies) == 3
    assert report.rad75.bytes == 3 * sum(p.stat().st_size for p in (tmp_path / "in" / "rad75").rglob("*.dcm"))
    assert report.zero_errors
    gateway_cpu = [v for k, v in report.iti55.cpu.items() if k.startswith("gateway")]
    assert len(gateway_cpu) == 1 and gateway_cpu[0] > 0  # the worker processes were metered
