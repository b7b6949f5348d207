"""Logging set-up: plain text or one JSON object per line, each record carrying the correlation id.

The correlation id is the ``wsa:MessageID`` of the SOAP exchange a log line belongs to. The web
pipeline binds it (with the transaction and the partner) for every inbound request as soon as the
MessageID is read; the initiating side binds its outgoing MessageID with :func:`bind_correlation`.
Context variables follow the request through ``await`` and into worker threads started with
``anyio.to_thread`` (they copy the context), so lines logged deep inside a handler carry it too.

A JSON line looks like::

    {"ts": "2024-05-01T12:00:00.123456+00:00", "level": "INFO", "logger": "xig.web",
     "message": "...", "correlation_id": "urn:uuid:...", "transaction": "RAD-75",
     "partner": "partner.example.org (3f2a9c01)"}

plus ``exception`` (the formatted traceback) when the record has one, and any ``extra={...}`` keys
whose values are JSON types.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json as _json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import IO, Any

__all__ = ["JsonFormatter", "ContextFilter", "bind_correlation", "configure_logging", "correlation_id",
           "partner_var", "transaction_var"]

#: the wsa:MessageID of the exchange being processed (inbound: the request's; outbound: ours)
correlation_id: ContextVar[str | None] = ContextVar("xig_correlation_id", default=None)
#: the IHE transaction of that exchange (``ITI-55``, ``RAD-75``...)
transaction_var: ContextVar[str | None] = ContextVar("xig_transaction", default=None)
#: the partner label (see :func:`gateway.web.limits.partner_label`)
partner_var: ContextVar[str | None] = ContextVar("xig_partner", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"
#: the same with the process id, for several worker processes writing to one stream
WORKER_TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"

#: LogRecord attributes that are not "extra" fields
_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "correlation_id", "transaction", "partner", "taskName"}


@contextlib.contextmanager
def bind_correlation(message_id: str | None, *, transaction: str | None = None,
                     partner: str | None = None) -> Iterator[None]:
    """Log lines inside the block carry ``message_id`` (and the transaction / partner when given)."""
    tokens: list[tuple[ContextVar[str | None], Token[str | None]]] = [(correlation_id, correlation_id.set(message_id))]
    if transaction is not None:
        tokens.append((transaction_var, transaction_var.set(transaction)))
    if partner is not None:
        tokens.append((partner_var, partner_var.set(partner)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the context variables onto every record (``-`` when unset, for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation_id.get() or getattr(record, "correlation_id", None) or "-"
        record.transaction = transaction_var.get() or getattr(record, "transaction", None)
        record.partner = partner_var.get() or getattr(record, "partner", None)
        return True


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        cid = getattr(record, "correlation_id", None)
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": None if cid in (None, "-") else cid,
            "transaction": getattr(record, "transaction", None),
            "partner": getattr(record, "partner", None),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_") and _jsonable(value):
                out[key] = value
        return _json.dumps(out, ensure_ascii=False, default=str)


_HANDLER_MARK = "_xig_handler"


def configure_logging(json: bool, level: int | str = logging.INFO, *, stream: IO[str] | None = None,
                      text_format: str = TEXT_FORMAT) -> logging.Handler:
    """Install XIG's handler on the root logger (replacing any previous root handler) and return it.

    ``json=True`` writes one JSON object per line (``[observability] json_logs``); otherwise a text
    line with the correlation id in brackets. uvicorn's loggers propagate to the root (the server
    passes ``log_config=None``), so they are formatted the same way.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if getattr(h, _HANDLER_MARK, False):
            h.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(text_format))
    handler.addFilter(ContextFilter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # pynetdicom logs each DIMSE message at INFO (see gateway.pacs.dimse.quiet_pynetdicom): only when verbose
    logging.getLogger("pynetdicom").setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    return handler
