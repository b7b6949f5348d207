"""XML Schema validity of a reply body against the official IHE / HL7 / OASIS schemas (family ``xsd``)."""

from __future__ import annotations

from lxml import etree

from conformance import spec
from conformance.checks.common import check
from conformance.model import Check
from gateway.soap.schema import default_schemas


def schema_check(transaction: str, body: etree._Element) -> Check:
    """``xsd.valid``: the body validates against its schema (an unknown root element fails too)."""
    errors = default_schemas().errors(body)
    detail = "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
    return check("xsd.valid", "xsd", f"{transaction} reply body is valid against its XML schema",
                 spec.XSD[transaction], not errors, detail)


__all__ = ["schema_check"]
