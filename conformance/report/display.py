"""Readable text of a recorded HTTP body: SOAP/XML parts as (re-indented) text, binary parts summarised."""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree

from gateway.errors import SoapFault
from gateway.soap import mtom, xml

#: at most this many characters of one body are shown
MAX_CHARS = 200_000


def header(headers: Sequence[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name.lower()), "")


def _pretty(data: bytes) -> str:
    """Re-indented XML (parsed with XIG's hardened parser: no DTD, no network), else the text as is."""
    try:
        root = xml.parse(data)
    except (SoapFault, ValueError):
        return data.decode("utf-8", "replace")
    etree.indent(root, space="  ")
    return str(etree.tostring(root, encoding="unicode"))


def _is_text(content_type: str, data: bytes) -> bool:
    ct = content_type.lower()
    return "xml" in ct or "text" in ct or (not ct and b"\x00" not in data[:4096])


def _parts(content_type: str, body: bytes) -> list[tuple[str, bytes]] | None:
    ct = mtom.parse_content_type(content_type)
    boundary = ct.get("boundary")
    if ct.media_type != mtom.MULTIPART_RELATED or not boundary:
        return None
    out = []
    for chunk in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            head, sep, data = chunk.lstrip(b"\n").partition(b"\n\n")
        part_type = ""
        for line in head.decode("latin-1", "replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.strip()
        out.append((part_type, data.rstrip(b"\r\n")))
    return out


def render(headers: Sequence[tuple[str, str]], body: bytes, truncated: bool = False) -> str:
    """Text for a human: each XML part re-indented, each binary part as ``[N bytes of type]``."""
    content_type = header(headers, "content-type")
    parts = _parts(content_type, body)
    if parts is None:
        text = _pretty(body) if _is_text(content_type, body) else f"[{len(body)} bytes of {content_type or 'data'}]"
    else:
        shown = []
        for i, (ptype, data) in enumerate(parts, 1):
            label = f"--- MIME part {i} ({ptype or 'no Content-Type'}) ---"
            if "xml" in ptype.lower():
                shown.append(f"{label}\n{_pretty(data)}")
            else:
                shown.append(f"{label}\n[{len(data)} bytes{' (cut)' if truncated and i == len(parts) else ''}]")
        text = "\n".join(shown)
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS] + f"\n[... {len(text) - MAX_CHARS} more characters]"
    if truncated:
        text += "\n[the recording keeps only the first part of this large response]"
    return text


__all__ = ["MAX_CHARS", "header", "render"]
