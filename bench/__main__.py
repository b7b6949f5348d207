"""``make bench``: run every benchmark and print ratios against their in-process references."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bench import initiating, load, rad75, transport
from bench.common import host_speed


def main() -> None:
    console = Console()
    before = host_speed()
    table = Table(title="XIG benchmarks (ratio = XIG / reference measured in the same run, loopback)")
    for col in ("benchmark", "XIG", "reference", "ratio"):
        table.add_column(col)
    for r in (*transport.run(), *rad75.run(), *initiating.run(), *load.run()):
        table.add_row(r.name, f"{r.value:,.1f} {r.unit}", f"{r.reference:,.1f} {r.unit}", f"{r.ratio:.2f}")
    console.print(table)
    console.print(f"host speed at the start: {before}; at the end: {host_speed()} (a VM: runs compare only when "
                  "these do)")


if __name__ == "__main__":
    main()
