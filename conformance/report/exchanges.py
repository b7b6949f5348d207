"""The raw request/response pairs of a run, byte for byte, one folder per scenario.

Layout::

    DIR/index.json                              every exchange: scenario, transaction, URL, status, files
    DIR/03-iti38-find-leafclass/01-ITI-38-request.http
    DIR/03-iti38-find-leafclass/01-ITI-38-response.http

Each ``.http`` file is the HTTP message as sent or received: start line, headers, a blank line and the
body bytes (MTOM packages included; a very large response is cut, and ``index.json`` says so). The
folder is built beside the target and moved into place at the end, so it is never half written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conformance.model import Exchange, ScenarioResult

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "x"


def _head(start: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [start, *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace")


def request_bytes(ex: Exchange) -> bytes:
    return _head(f"POST {ex.url} HTTP/1.1", ex.request_headers) + ex.request_body


def response_bytes(ex: Exchange) -> bytes:
    if ex.status is None:
        return f"# no response: {ex.error or 'unknown reason'}\n".encode()
    return _head(f"HTTP/1.1 {ex.status}", ex.response_headers) + ex.response_body


def write_exchanges(directory: Path, results: Sequence[ScenarioResult]) -> int:
    """Write every exchange of ``results`` under ``directory``; returns the count. An existing ``directory`` is
    replaced only when it is empty or an earlier run's folder (it has an ``index.json``)."""
    directory = directory.resolve()
    if directory.exists() and not (directory.is_dir() and ((directory / "index.json").is_file()
                                                           or not any(directory.iterdir()))):
        raise FileExistsError(f"{directory} exists and is not an exchanges folder of an earlier run; "
                              "choose another path (it is replaced only when it holds an index.json)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    index: list[dict[str, Any]] = []
    try:
        for si, r in enumerate(results, 1):
            folder = f"{si:02d}-{_safe(r.scenario_id)}"
            for ei, ex in enumerate(r.exchanges, 1):
                if ei == 1:
                    (staging / folder).mkdir()
                stem = f"{ei:02d}-{_safe(ex.transaction)}"
                (staging / folder / f"{stem}-request.http").write_bytes(request_bytes(ex))
                (staging / folder / f"{stem}-response.http").write_bytes(response_bytes(ex))
                index.append({"scenario": r.scenario_id, "transaction": ex.transaction, "url": ex.url,
                              "status": ex.status, "error": ex.error, "elapsed_ms": ex.elapsed_ms,
                              "response_truncated": ex.truncated,
                              "request": f"{folder}/{stem}-request.http", "response": f"{folder}/{stem}-response.http"})
        (staging / "index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.old"
            os.replace(directory, old)
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(index)


__all__ = ["request_bytes", "response_bytes", "write_exchanges"]
