"""RFC 5424 syslog framing of audit messages (pure: bytes in, bytes out, no I/O).

Every audit message travels as one RFC 5424 message (ITI TF-2 3.20.4.1.2)::

    <85>1 2026-11-22T08:56:30.123456Z host xig 4242 IHE+RFC-3881 - \\xEF\\xBB\\xBF<AuditMessage>...

* ``PRI`` 85 = facility 10 (security/authorization, "authpriv") * 8 + severity 5 (notice);
* ``VERSION`` 1; ``TIMESTAMP`` the moment the message was recorded, UTC, microseconds;
* ``HOSTNAME``, ``APP-NAME``, ``PROCID`` from the recording process (PRINTUSASCII, RFC length limits);
* ``MSGID`` ``IHE+RFC-3881``; ``STRUCTURED-DATA`` the NILVALUE ``-`` (IHE puts everything in MSG);
* ``MSG`` the UTF-8 XML of the DICOM audit message.

**The BOM.** RFC 5424 6.4 distinguishes ``MSG-UTF8 = BOM UTF-8-STRING`` from ``MSG-ANY`` (octets "not
starting with BOM"). An audit message *is* UTF-8 text (ITI TF-2 3.20.4.1.2), so XIG sends the MSG-UTF8 form
with the BOM ``EF BB BF`` by default — as dcm4che does — which tells a syslog relay the octets are UTF-8
rather than an unknown charset. XML 1.0 (4.3.3 and Appendix F) lets a UTF-8 document start with a BOM, so
an audit record repository parsing MSG as XML reads it unchanged. ``frame(..., bom=False)`` produces the
MSG-ANY form for a repository that insists; :func:`parse` accepts both and reports which one it saw.

**Transports.** RFC 5425 (TLS) sends each message as ``MSG-LEN SP SYSLOG-MSG`` (octet counting,
:func:`octet_count`; :class:`OctetCountedReader` splits such a stream again). RFC 5426 (UDP) sends one
message per datagram, unframed; :data:`UDP_MAX_IPV4` / :data:`UDP_MAX_IPV6` are the largest datagrams UDP
can carry (RFC 5426 3.2).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

#: facility 10 (security/authorization messages) * 8 + severity 5 (notice): ITI TF-2 3.20.4.1.2
PRI = 85
FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
VERSION = 1
#: the MSGID of an audit message in the DICOM / RFC 3881 format (ITI TF-2 3.20.4.1.2)
MSGID = "IHE+RFC-3881"
NILVALUE = "-"
BOM = b"\xef\xbb\xbf"
#: largest UDP payload: 65535 - 8 (UDP header) - 20 (IPv4 header) / - 0 for IPv6 (its header is not counted)
UDP_MAX_IPV4 = 65507
UDP_MAX_IPV6 = 65527

#: RFC 5424 6: field length limits (octets)
MAX_HOSTNAME = 255
MAX_APP_NAME = 48
MAX_PROCID = 128
MAX_MSGID = 32

_NOT_PRINTUSASCII = re.compile(rb"[^\x21-\x7e]")
_HEADER = re.compile(
    rb"<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app_name>\S+) "
    rb"(?P<procid>\S+) (?P<msgid>\S+) ")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$")
_MSG_LEN = re.compile(rb"[1-9][0-9]{0,9}")


class SyslogFormatError(ValueError):
    """Bytes that are not an RFC 5424 message (or not an RFC 5425 frame); the text names the problem."""


def header_field(value: str | None, limit: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII only (anything else becomes ``_``), at most ``limit`` octets,
    NILVALUE when empty."""
    if not value:
        return NILVALUE
    cleaned = _NOT_PRINTUSASCII.sub(b"_", value.encode("utf-8", "replace")).decode("ascii")
    return cleaned[:limit] or NILVALUE


def format_timestamp(when: dt.datetime) -> str:
    """RFC 5424 TIMESTAMP (RFC 3339 with at most 6 fractional digits) in UTC, e.g. ``2026-11-22T08:56:30.123456Z``.

    A naive ``when`` is taken as UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def frame(msg: bytes, *, hostname: str, app_name: str, procid: str, timestamp: dt.datetime | str,
          bom: bool = True) -> bytes:
    """One RFC 5424 SYSLOG-MSG carrying the audit XML ``msg``: ``<85>1 TIMESTAMP HOSTNAME APP-NAME PROCID
    IHE+RFC-3881 - [BOM]msg``. ``timestamp`` is a datetime or an already formatted RFC 5424 TIMESTAMP."""
    stamp = timestamp if isinstance(timestamp, str) else format_timestamp(timestamp)
    if stamp != NILVALUE and not _TIMESTAMP.match(stamp):
        raise SyslogFormatError(f"{stamp!r} is not an RFC 5424 TIMESTAMP")
    header = " ".join((f"<{PRI}>{VERSION}", stamp, header_field(hostname, MAX_HOSTNAME),
                       header_field(app_name, MAX_APP_NAME), header_field(procid, MAX_PROCID), MSGID, NILVALUE))
    if msg.startswith(BOM):
        msg = msg[len(BOM):]
    return header.encode("ascii") + b" " + (BOM if bom else b"") + msg


def octet_count(syslog_msg: bytes) -> bytes:
    """The RFC 5425 4.3 frame of one message: ``MSG-LEN SP SYSLOG-MSG`` (MSG-LEN in octets)."""
    return str(len(syslog_msg)).encode("ascii") + b" " + syslog_msg


@dataclass(frozen=True)
class SyslogMessage:
    """One parsed RFC 5424 message. ``msg`` is the MSG without its BOM; ``bom`` tells whether it had one."""

    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes
    bom: bool

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8

    @property
    def when(self) -> dt.datetime | None:
        """The TIMESTAMP as an aware datetime (None for the NILVALUE)."""
        if self.timestamp == NILVALUE:
            return None
        return dt.datetime.fromisoformat(self.timestamp.replace("Z", "+00:00"))


def _structured_data(rest: bytes) -> tuple[str, bytes]:
    """Split STRUCTURED-DATA (NILVALUE or SD-ELEMENTs, with escaped ``"``, ``\\`` and ``]``) from the rest."""
    if rest.startswith(b"-"):
        return NILVALUE, rest[1:]
    if not rest.startswith(b"["):
        raise SyslogFormatError("STRUCTURED-DATA is neither '-' nor an SD-ELEMENT")
    i, in_quotes = 0, False
    while i < len(rest):
        c = rest[i:i + 1]
        if in_quotes:
            if c == b"\\":
                i += 1
            elif c == b'"':
                in_quotes = False
        elif c == b'"':
            in_quotes = True
        elif c == b"]" and rest[i + 1:i + 2] != b"[":
            return rest[:i + 1].decode("utf-8", "replace"), rest[i + 1:]
        i += 1
    raise SyslogFormatError("unterminated STRUCTURED-DATA")


def parse(data: bytes) -> SyslogMessage:
    """Read one RFC 5424 SYSLOG-MSG (not octet-counted); raises :class:`SyslogFormatError` naming the problem."""
    m = _HEADER.match(data)
    if m is None:
        raise SyslogFormatError(f"not an RFC 5424 header: {data[:80]!r}")
    pri = int(m["pri"])
    if pri > 191:
        raise SyslogFormatError(f"PRI {pri} is out of range (0..191)")
    fields = {k: m[k].decode("ascii", "replace") for k in ("timestamp", "hostname", "app_name", "procid", "msgid")}
    if fields["timestamp"] != NILVALUE and not _TIMESTAMP.match(fields["timestamp"]):
        raise SyslogFormatError(f"{fields['timestamp']!r} is not an RFC 5424 TIMESTAMP")
    for name, limit in (("hostname", MAX_HOSTNAME), ("app_name", MAX_APP_NAME), ("procid", MAX_PROCID),
                        ("msgid", MAX_MSGID)):
        if len(fields[name]) > limit:
            raise SyslogFormatError(f"{name.upper().replace('_', '-')} is longer than {limit} octets")
    sd, rest = _structured_data(data[m.end():])
    if rest and not rest.startswith(b" "):
        raise SyslogFormatError("no space between STRUCTURED-DATA and MSG")
    msg = rest[1:]
    has_bom = msg.startswith(BOM)
    return SyslogMessage(pri=pri, version=int(m["version"]), structured_data=sd, msg=msg[len(BOM):] if has_bom else msg,
                         bom=has_bom, **fields)


class OctetCountedReader:
    """Splits an RFC 5425 byte stream into messages: ``feed(chunk)`` returns the messages completed so far."""

    def __init__(self, max_message: int = 16 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self.max_message = max_message

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        out: list[bytes] = []
        while True:
            space = self._buffer.find(b" ", 0, 12)
            if space < 0:
                if len(self._buffer) >= 12:
                    raise SyslogFormatError(f"no MSG-LEN at the start of {bytes(self._buffer[:20])!r}")
                return out
            length = bytes(self._buffer[:space])
            if not _MSG_LEN.fullmatch(length):
                raise SyslogFormatError(f"MSG-LEN {length!r} is not a positive decimal number")
            size = int(length)
            if size > self.max_message:
                raise SyslogFormatError(f"MSG-LEN {size} exceeds {self.max_message} octets")
            if len(self._buffer) < space + 1 + size:
                return out
            out.append(bytes(self._buffer[space + 1:space + 1 + size]))
            del self._buffer[:space + 1 + size]

    @property
    def pending(self) -> int:
        """Octets received that do not yet form a whole message."""
        return len(self._buffer)
