"""How long each partner community took to answer, kept in the database (SQLAlchemy adapter).

The fan-outs of :mod:`gateway.initiating.fanout` read it to start the partners that usually answer last
first, and record what they observed after each fan-out. One row per (transaction, homeCommunityId): an
exponentially weighted moving average (weight :data:`WEIGHT` for the newest observation), the last
observation and the number of observations. Updates are one ``INSERT … ON CONFLICT DO UPDATE`` per
community computing the new average in SQL, so concurrent fan-outs (several processes, PostgreSQL or
SQLite) never lose an observation to a read-modify-write race.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Final

from sqlalchemy import Engine, select

from gateway.store.db import dialect_insert
from gateway.store.tables import partner_response_times as table

#: weight of the newest observation in the moving average: a partner that became slow (or fast) is
#: ranked by its new speed after two or three fan-outs, while one odd answer moves it only part of the way
WEIGHT: Final = 0.4


class SqlResponseTimes:
    """:class:`gateway.initiating.fanout.ResponseTimes` on the gateway's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def expected(self, transaction: str, home_community_ids: Iterable[str]) -> dict[str, float]:
        """The moving average of each listed community that has one (seconds)."""
        wanted = list(dict.fromkeys(home_community_ids))
        if not wanted:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(select(table.c.home_community_id, table.c.average_seconds).where(
                table.c.transaction == transaction, table.c.home_community_id.in_(wanted)))
            return {hcid: float(avg) for hcid, avg in rows}

    def record(self, transaction: str, seconds: Mapping[str, float]) -> None:
        """Fold one observation per community into its average (a first observation becomes the average)."""
        if not seconds:
            return
        now = dt.datetime.now(dt.UTC)
        rows = [{"transaction": transaction, "home_community_id": hcid, "average_seconds": max(0.0, float(v)),
                 "last_seconds": max(0.0, float(v)), "samples": 1, "updated_at": now} for hcid, v in seconds.items()]
        with self.engine.begin() as conn:
            stmt = dialect_insert(conn, table)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[table.c.transaction, table.c.home_community_id],
                set_={"average_seconds": table.c.average_seconds
                      + WEIGHT * (stmt.excluded.last_seconds - table.c.average_seconds),
                      "last_seconds": stmt.excluded.last_seconds, "samples": table.c.samples + 1,
                      "updated_at": stmt.excluded.updated_at}), rows)

    def all(self) -> list[tuple[str, str, float, float, int, dt.datetime]]:
        """Every row: (transaction, homeCommunityId, average, last, samples, updated_at), for ``xig partners ls``."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(
                table.c.transaction, table.c.home_community_id, table.c.average_seconds, table.c.last_seconds,
                table.c.samples, table.c.updated_at).order_by(table.c.transaction, table.c.home_community_id))
            # SQLite gives back naive datetimes: they were written in UTC
            return [(tr, hcid, float(avg), float(last), int(n), at if at.tzinfo else at.replace(tzinfo=dt.UTC))
                    for tr, hcid, avg, last, n, at in rows]


__all__ = ["WEIGHT", "SqlResponseTimes"]
