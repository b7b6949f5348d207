"""The one place where :class:`~gateway.errors.SoapFault` becomes a SOAP 1.2 Fault envelope, and back.

SOAP 1.2 Part 1 §5.4: ``env:Code/env:Value`` (Sender, Receiver, MustUnderstand, VersionMismatch),
optional ``env:Subcode/env:Value`` (a QName such as ``wsse:InvalidSecurity``), ``env:Reason/env:Text``
and an optional ``env:Detail``. WS-Addressing 1.0 SOAP Binding §6: faults use the Action
``http://www.w3.org/2005/08/addressing/soap/fault`` and relate to the request's MessageID.
"""

from __future__ import annotations

from lxml import etree

from gateway.errors import XIG_NS, QName, SoapFault
from gateway.soap import ns
from gateway.soap.envelope import build_envelope

_CODES = {"Sender", "Receiver", "MustUnderstand", "VersionMismatch", "DataEncodingUnknown"}


def build_fault_envelope(fault: SoapFault, *, relates_to: str | None = None) -> etree._Element:
    nsmap: dict[str | None, str] = {"soap": ns.SOAP12}
    if fault.subcode is not None:
        nsmap[fault.subcode.prefix] = fault.subcode.namespace
    el = etree.Element(ns.q(ns.SOAP12, "Fault"), nsmap=nsmap)
    code = etree.SubElement(el, ns.q(ns.SOAP12, "Code"))
    etree.SubElement(code, ns.q(ns.SOAP12, "Value")).text = f"soap:{fault.code}"
    if fault.subcode is not None:
        sub = etree.SubElement(code, ns.q(ns.SOAP12, "Subcode"))
        etree.SubElement(sub, ns.q(ns.SOAP12, "Value")).text = str(fault.subcode)
    reason = etree.SubElement(el, ns.q(ns.SOAP12, "Reason"))
    text = etree.SubElement(reason, ns.q(ns.SOAP12, "Text"))
    text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    text.text = fault.reason
    if fault.detail:
        detail = etree.SubElement(el, ns.q(ns.SOAP12, "Detail"))
        etree.SubElement(detail, ns.q(XIG_NS, "Detail"), nsmap={"xig": XIG_NS}).text = fault.detail
    extra: list[etree._Element] = []
    not_understood = fault.headers.get("not-understood")
    if fault.code == "MustUnderstand" and not_understood:
        qn = etree.QName(not_understood)
        nu = etree.Element(ns.q(ns.SOAP12, "NotUnderstood"), nsmap={"soap": ns.SOAP12, "nu": qn.namespace or ""})
        nu.set("qname", f"nu:{qn.localname}")
        extra.append(nu)
    return build_envelope(el, action=ns.WSA_FAULT_ACTION, relates_to=relates_to, extra_headers=extra)


def _resolve_qname(el: etree._Element, text: str) -> tuple[str | None, str]:
    prefix, _, local = text.strip().rpartition(":")
    namespace = el.nsmap.get(prefix or None)
    return namespace, local


def parse_fault(body: etree._Element) -> SoapFault | None:
    """If ``body`` (the payload element of a SOAP Body) is a Fault, return it as a :class:`SoapFault`."""
    if body.tag != ns.q(ns.SOAP12, "Fault"):
        return None
    value = body.find(f"{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Value")
    code_ns, code_local = _resolve_qname(value, value.text or "") if value is not None else (None, "Receiver")
    code = code_local if code_ns == ns.SOAP12 and code_local in _CODES else "Receiver"
    subcode: QName | None = None
    sub = body.find(f"{{{ns.SOAP12}}}Code/{{{ns.SOAP12}}}Subcode/{{{ns.SOAP12}}}Value")
    if sub is not None and sub.text:
        sub_ns, sub_local = _resolve_qname(sub, sub.text)
        prefix = sub.text.strip().rpartition(":")[0]
        subcode = QName(sub_ns or "", sub_local, prefix)
    reason_el = body.find(f"{{{ns.SOAP12}}}Reason/{{{ns.SOAP12}}}Text")
    reason = (reason_el.text or "").strip() if reason_el is not None else ""
    detail_el = body.find(f"{{{ns.SOAP12}}}Detail")
    detail = " ".join("".join(detail_el.itertext()).split()) if detail_el is not None else None
    return SoapFault(code, reason, subcode, detail or None)  # type: ignore[arg-type]
