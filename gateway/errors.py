"""One exception hierarchy for protocol errors.

Every error a partner can cause or observe is a :class:`SoapFault` carrying the SOAP 1.2 fault code,
an optional subcode (a QName, e.g. ``wsse:InvalidSecurity``) and a reason a partner's engineer can
act on. A single place (``gateway.soap.fault``) turns them into SOAP 1.2 Fault envelopes; nothing
else formats errors for the wire, and no stack trace ever leaves the process.

Registry-level errors (``XDSRegistryError``, ``XDSUnknownRepositoryId``, ...) are not faults: they
travel inside a successful SOAP response as ``rs:RegistryError`` and live with the transactions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gateway.soap import ns

FaultCode = Literal["Sender", "Receiver", "MustUnderstand", "VersionMismatch", "DataEncodingUnknown"]


@dataclass(frozen=True)
class QName:
    namespace: str
    local: str
    prefix: str

    @property
    def clark(self) -> str:
        return ns.q(self.namespace, self.local)

    def __str__(self) -> str:
        return f"{self.prefix}:{self.local}"


# WS-Addressing 1.0 SOAP binding fault subcodes (W3C WS-Addressing 1.0 SOAP Binding §6.4)
WSA_ACTION_NOT_SUPPORTED = QName(ns.WSA, "ActionNotSupported", "wsa")
WSA_INVALID_HEADER = QName(ns.WSA, "InvalidAddressingHeader", "wsa")
WSA_MISSING_HEADER = QName(ns.WSA, "MessageAddressingHeaderRequired", "wsa")
WSA_DESTINATION_UNREACHABLE = QName(ns.WSA, "DestinationUnreachable", "wsa")
# WS-Security 1.0 fault codes (WSS: SOAP Message Security 1.0 §12)
WSSE_UNSUPPORTED_SECURITY_TOKEN = QName(ns.WSSE, "UnsupportedSecurityToken", "wsse")
WSSE_UNSUPPORTED_ALGORITHM = QName(ns.WSSE, "UnsupportedAlgorithm", "wsse")
WSSE_INVALID_SECURITY = QName(ns.WSSE, "InvalidSecurity", "wsse")
WSSE_INVALID_SECURITY_TOKEN = QName(ns.WSSE, "InvalidSecurityToken", "wsse")
WSSE_FAILED_AUTHENTICATION = QName(ns.WSSE, "FailedAuthentication", "wsse")
WSSE_FAILED_CHECK = QName(ns.WSSE, "FailedCheck", "wsse")
WSSE_SECURITY_TOKEN_UNAVAILABLE = QName(ns.WSSE, "SecurityTokenUnavailable", "wsse")
WSSE_MESSAGE_EXPIRED = QName(ns.WSSE, "MessageExpired", "wsse")
# XIG's own subcodes for the transport pipeline (namespace of this project)
XIG_NS = "urn:xig:fault"
XIG_MALFORMED = QName(XIG_NS, "MalformedMessage", "xig")
XIG_TOO_LARGE = QName(XIG_NS, "MessageTooLarge", "xig")
XIG_SCHEMA_INVALID = QName(XIG_NS, "SchemaValidationFailed", "xig")
XIG_FORBIDDEN_XML = QName(XIG_NS, "ForbiddenXmlConstruct", "xig")
XIG_UNSUPPORTED_MEDIA = QName(XIG_NS, "UnsupportedMediaType", "xig")
XIG_NOT_IMPLEMENTED = QName(XIG_NS, "NotImplemented", "xig")
XIG_INTERNAL = QName(XIG_NS, "InternalError", "xig")
XIG_BUSY = QName(XIG_NS, "Busy", "xig")


class XigError(Exception):
    """Base of every error XIG raises on purpose."""


@dataclass(eq=False)
class SoapFault(XigError):
    """A SOAP 1.2 fault to send back (or one received from a partner)."""

    code: FaultCode
    reason: str
    subcode: QName | None = None
    detail: str | None = None
    #: HTTP status of the fault response; SOAP 1.2 Part 2 §7.5.1.2: Sender → 400, others → 500.
    http_status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.code}{'/' + str(self.subcode) if self.subcode else ''}: {self.reason}")

    @property
    def status(self) -> int:
        if self.http_status is not None:
            return self.http_status
        return 400 if self.code == "Sender" else 500


def sender_fault(subcode: QName, reason: str, detail: str | None = None, status: int | None = None) -> SoapFault:
    return SoapFault("Sender", reason, subcode, detail, status)


def receiver_fault(subcode: QName, reason: str, detail: str | None = None, status: int | None = None) -> SoapFault:
    return SoapFault("Receiver", reason, subcode, detail, status)


class SecurityError(SoapFault):
    """A WS-Security / XUA failure; always a Sender fault with a ``wsse:`` subcode."""

    def __init__(self, subcode: QName, reason: str) -> None:
        super().__init__("Sender", reason, subcode)
