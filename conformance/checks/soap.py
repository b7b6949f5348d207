"""SOAP 1.2 / WS-Addressing / MTOM framing of a reply (family ``soap``) and of faults."""

from __future__ import annotations

from collections.abc import Collection

from conformance import spec
from conformance.checks.common import check, describe_fault
from conformance.model import Check
from conformance.session import Sent
from gateway.soap import mtom, ns
from gateway.web.client import SoapReply
from gateway.web.endpoints import BY_TRANSACTION


def _header(reply: SoapReply, local: str) -> str | None:
    el = reply.envelope.find(f"{{{ns.SOAP12}}}Header/{{{ns.WSA}}}{local}")
    return "".join(el.itertext()).strip() if el is not None else None


def body_name(reply: SoapReply) -> str:
    tag = reply.body.tag
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else "?"


def _relates_to(sent: Sent, reply: SoapReply, family: str) -> Check:
    mid = sent.message_id or ""
    got = reply.relates_to
    ok = got is not None and got.strip().lower() == mid.strip().lower()
    detail = "no wsa:RelatesTo header" if got is None else (
        "" if ok else f"relates to {got!r}, our request was {mid!r}")
    return check(f"{family}.relates-to", family, "wsa:RelatesTo names our request's wsa:MessageID",
                 spec.WSA_RELATES_TO, ok, detail)


def _message_id(sent: Sent, reply: SoapReply, family: str) -> Check:
    got = _header(reply, "MessageID")
    same = got is not None and sent.message_id is not None and got.lower() == sent.message_id.lower()
    return check(f"{family}.message-id", family, "the reply's wsa:MessageID (if any) is its own, not a copy of ours",
                 spec.WSA_MESSAGE_ID, not same, f"the reply reuses our MessageID {got}" if same else "")


def reply_checks(sent: Sent, *, mtom_expected: bool | None = None) -> list[Check]:
    """A normal (non-fault) reply of ``sent.transaction``: transport, no fault, HTTP 200, Action, RelatesTo,
    MessageID and — for ITI-39 / RAD-75 (``mtom_expected`` default) — an MTOM/XOP package."""
    t = sent.transaction
    endpoint = BY_TRANSACTION[t]
    out = [check("soap.reply", "soap", f"{t}: a SOAP 1.2 reply arrives", spec.SOAP12, sent.reply is not None,
                 sent.problem or "")]
    reply = sent.reply
    if reply is None:
        return out
    fault = reply.fault
    out.append(check("soap.no-fault", "soap", f"{t}: the reply is an answer, not a SOAP fault", spec.SOAP_FAULT,
                     fault is None, describe_fault(fault) if fault is not None else ""))
    if fault is None:
        out.append(check("soap.http-status", "soap", "HTTP status 200 for a normal reply", spec.SOAP_HTTP_STATUS,
                         reply.http_status == 200, "" if reply.http_status == 200 else f"HTTP {reply.http_status}"))
        ok = reply.action == endpoint.response_action
        detail = ("no wsa:Action header" if reply.action is None else
                  "" if ok else f"wsa:Action is {reply.action!r}, expected {endpoint.response_action!r}")
        out.append(check("soap.action", "soap", f"wsa:Action is the {t} response Action", spec.ACTION[t], ok,
                         detail))
    out.append(_relates_to(sent, reply, "soap"))
    out.append(_message_id(sent, reply, "soap"))
    if mtom_expected if mtom_expected is not None else endpoint.mtom:
        ct = mtom.parse_content_type(reply.content_type)
        problems = []
        if ct.media_type != mtom.MULTIPART_RELATED:
            problems.append(f"Content-Type is {ct.media_type or 'missing'}, not multipart/related")
        else:
            if (ct.get("type") or "").lower() != mtom.XOP_MEDIA_TYPE:
                problems.append(f'type parameter is {ct.get("type")!r}, expected "application/xop+xml"')
            if (ct.get("start-info") or "").lower() not in ("", "application/soap+xml"):
                problems.append(f'start-info is {ct.get("start-info")!r}, expected "application/soap+xml"')
        out.append(check("soap.mtom", "soap", f"{t} reply is an MTOM/XOP package (SOAP 1.2)", spec.MTOM,
                         not problems, "; ".join(problems)))
    return out


def fault_checks(sent: Sent, *, family: str, clause: str, what: str, code: str | None = "Sender",
                 subcode_namespace: str | None = None, subcodes: Collection[str] = ()) -> list[Check]:
    """The partner must refuse ``sent`` with a SOAP 1.2 Fault: ``{family}.fault`` (citing ``clause``), the
    fault code, the subcode namespace/local names when given, the fault Action, RelatesTo, an error status."""
    out = [check("soap.reply", "soap", f"{sent.transaction}: a SOAP 1.2 reply arrives", spec.SOAP12,
                 sent.reply is not None, sent.problem or "")]
    reply = sent.reply
    if reply is None:
        return out
    fault = reply.fault
    detail = "" if fault is not None else (f"the partner answered normally ({body_name(reply)}, Action "
                                           f"{reply.action}, HTTP {reply.http_status}) instead of refusing")
    out.append(check(f"{family}.fault", family, f"{what} is refused with a SOAP fault", clause, fault is not None,
                     detail))
    if fault is None:
        return out
    if code is not None:
        out.append(check("soap.fault-code", "soap", f"the fault Code is {code}", spec.SOAP_FAULT,
                         fault.code == code, "" if fault.code == code else describe_fault(fault)))
    if subcode_namespace is not None or subcodes:
        sub = fault.subcode
        ok = sub is not None and (subcode_namespace is None or sub.namespace == subcode_namespace) and \
            (not subcodes or sub.local in subcodes)
        names = " or ".join(sorted(subcodes)) or "a subcode"
        wanted = f"{names} in {subcode_namespace}" if subcode_namespace else names
        out.append(check(f"{family}.fault-subcode", family, "the fault Subcode is the one defined for this error",
                         clause, ok, f"expected {wanted}; got {describe_fault(fault)}"))
    ok = reply.action == ns.WSA_FAULT_ACTION
    out.append(check("soap.fault-action", "soap", "the fault's wsa:Action is the WS-Addressing fault Action",
                     spec.WSA_FAULT_ACTION, ok, "" if ok else f"wsa:Action is {reply.action!r}"))
    if sent.message_id is not None:
        out.append(_relates_to(sent, reply, "soap"))
    ok = reply.http_status >= 400
    out.append(check("soap.fault-http-status", "soap", "a fault travels with an HTTP error status (400 Sender, "
                     "500 others)", spec.SOAP_HTTP_STATUS, ok, f"HTTP {reply.http_status}"))
    return out


__all__ = ["body_name", "fault_checks", "reply_checks"]
