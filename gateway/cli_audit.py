"""``xig audit ls`` and ``xig audit export``: the local ATNA audit trail (:mod:`gateway.store.audit`)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.config import Config

console = Console()
err = Console(stderr=True)

OUTCOMES = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}
_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="XIG configuration file (TOML).")]
PatientOption = Annotated[str | None, typer.Option(
    "--patient", help="patient id: the CX form (ID^^^&OID&ISO) or just the ID")]
SinceOption = Annotated[str | None, typer.Option(
    "--since", help="events at or after: an ISO date/time (2026-11-22, 2026-11-22T08:00Z) or an age (30m, 24h, 7d)")]
UserOption = Annotated[str | None, typer.Option("--user", help="part of the user name (any case)")]
CommunityOption = Annotated[str | None, typer.Option(
    "--community", help="remote homeCommunityId, with or without urn:oid:")]
EventOption = Annotated[str | None, typer.Option("--event", help="IHE transaction (ITI-55, RAD-75...) or EventID code")]


def parse_since(value: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """``30m`` / ``24h`` / ``7d`` / ``2w`` ago, or an ISO date or date-time (UTC when it has no offset)."""
    text = value.strip()
    m = _RELATIVE.match(text)
    if m:
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(**{_UNITS[m[2]]: int(m[1])})
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {value!r} is neither an ISO date/time (2026-11-22, 2026-11-22T08:00Z) "
                         "nor an age (30m, 24h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _filters(patient: str | None, since: str | None, user: str | None, community: str | None,
             event: str | None) -> Any:
    from gateway.store.audit import AuditFilter

    try:
        when = parse_since(since) if since else None
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    return AuditFilter(patient=patient or None, since=when, user=user or None, community=community or None,
                       event=event or None)


@contextmanager
def _store(cfg: Config) -> Iterator[Any]:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.store.audit import SqlAuditStore
    from gateway.store.db import open_database

    try:
        engine = open_database(cfg.database.url, cfg.base_dir)
    except SQLAlchemyError as exc:
        err.print(f"[red]the database {cfg.database.url.split('@')[-1]} is not usable: {str(exc).splitlines()[0]}[/]")
        raise typer.Exit(1) from None
    try:
        yield SqlAuditStore(engine)
    except SQLAlchemyError as exc:
        err.print(f"[red]reading the audit trail failed: {str(exc).splitlines()[0]}[/]")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat() if value is not None else None


def as_record(item: Any, *, with_message: bool) -> dict[str, Any]:
    """One stored audit message as JSON: its summary, delivery state per repository, optionally its XML."""
    s = item.summary
    record: dict[str, Any] = {
        "id": item.id, "event_time": _iso(s.when), "recorded_at": _iso(item.recorded_at), "event": s.event,
        "outcome": s.outcome, "outcome_text": OUTCOMES.get(s.outcome, str(s.outcome)), "user": s.user,
        "community": s.community, "patients": list(s.patients), "studies": list(s.studies),
        "delivery": [{"repository": d.repository, "state": d.state, "attempts": d.attempts,
                      "last_error": d.last_error or None, "delivered_at": _iso(d.delivered_at)}
                     for d in item.deliveries],
    }
    if with_message:
        record["message"] = item.xml.decode("utf-8")
    return record


def _delivery_text(item: Any) -> str:
    if not item.deliveries:
        return "local only"
    return ", ".join(f"{d.repository}: {d.state}" for d in item.deliveries)


def _write_lines(items: Iterator[Any], out: IO[str]) -> int:
    n = 0
    for item in items:
        out.write(json.dumps(as_record(item, with_message=True), ensure_ascii=False) + "\n")
        n += 1
    return n


def register(app: typer.Typer, load: Any) -> None:
    """Add the ``audit`` command group to the main ``xig`` app (``load`` reads and checks a config)."""
    audit_app = typer.Typer(no_args_is_help=True, help="The local ATNA audit trail: list and export audit messages.")

    @audit_app.command("ls")
    def audit_ls(config: ConfigOption, patient: PatientOption = None, since: SinceOption = None,
                 user: UserOption = None, community: CommunityOption = None, event: EventOption = None,
                 limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many, newest first")] = 50,
                 as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
        """Audit messages recorded by this gateway, newest first, with their delivery state."""
        cfg = load(config)
        f = _filters(patient, since, user, community, event)
        with _store(cfg) as store:
            items = list(store.query(f, limit=limit, newest_first=True))
        if as_json:
            print(json.dumps([as_record(i, with_message=False) for i in items], indent=2, ensure_ascii=False))
            return
        if not items:
            console.print("no audit messages match")
            return
        t = Table("#", "Time (UTC)", "Event", "Outcome", "User", "Community", "Patients", "Studies", "Delivery")
        for i in items:
            s = i.summary
            t.add_row(str(i.id), s.when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"), s.event,
                      OUTCOMES.get(s.outcome, str(s.outcome)), s.user, s.community, "\n".join(s.patients),
                      "\n".join(s.studies), _delivery_text(i))
        console.print(t)

    @audit_app.command("export")
    def audit_export(config: ConfigOption, patient: PatientOption = None, since: SinceOption = None,
                     user: UserOption = None, community: CommunityOption = None, event: EventOption = None,
                     out: Annotated[Path | None, typer.Option(
                         "--out", "-o", help="file to write (default: standard output)")] = None) -> None:
        """JSON lines, oldest first: one DICOM audit message per line with its summary and delivery state."""
        cfg = load(config)
        f = _filters(patient, since, user, community, event)
        with _store(cfg) as store:
            if out is None:
                _write_lines(store.query(f), sys.stdout)
                sys.stdout.flush()
                return
            target = out.resolve()
            if not target.parent.is_dir():
                err.print(f"[red]cannot write {out}: the folder {target.parent} does not exist[/]")
                raise typer.Exit(2)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    n = _write_lines(store.query(f), fh)
                os.replace(tmp, target)  # never a half-written export
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        err.print(f"{n} audit message(s) exported to {out}")

    app.add_typer(audit_app, name="audit")
