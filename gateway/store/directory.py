"""Partners imported from a FHIR directory, kept in the database (SQLAlchemy adapter)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable

from sqlalchemy import Engine, delete, select, text

from gateway.initiating.partners import Partner
from gateway.store.tables import directory_partners


class SqlDirectory:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def replace_all(self, partners: Iterable[Partner], source_file: str = "") -> int:
        """Make ``partners`` the imported directory (a re-import replaces the previous one)."""
        now = dt.datetime.now(dt.UTC)
        rows = [{"home_community_id": p.home_community_id, "name": p.name,
                 "entry": json.dumps(dataclasses.asdict(p)), "source_file": source_file, "imported_at": now}
                for p in partners]
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # two imports at once: the second waits for the first instead of failing on its new rows;
                # readers keep seeing the previous directory until the commit (SQLite: one writer anyway)
                conn.execute(text("LOCK TABLE directory_partners IN SHARE ROW EXCLUSIVE MODE"))
            conn.execute(delete(directory_partners))
            if rows:
                conn.execute(directory_partners.insert(), rows)
        return len(rows)

    def partners(self) -> list[Partner]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(directory_partners.c.entry).order_by(directory_partners.c.name))
            out = []
            for (entry,) in rows:
                data = json.loads(entry)
                data["accepted_purposes"] = tuple(data.get("accepted_purposes") or ())
                out.append(Partner(**data))
            return out
