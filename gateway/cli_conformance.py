"""``xig conformance ...``."""

from __future__ import annotations

from typing import Any

import typer


def register(app: typer.Typer, load: Any) -> None:
    """Add the ``conformance`` command group to the main ``xig`` app (``load`` reads and checks a config)."""
