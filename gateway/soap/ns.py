"""XML namespace URIs used across XIG, named as in the specifications."""

from __future__ import annotations

SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://www.w3.org/2005/08/addressing"
WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
WSA_FAULT_ACTION = "http://www.w3.org/2005/08/addressing/soap/fault"
XOP = "http://www.w3.org/2004/08/xop/include"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
WSSE11 = "http://docs.oasis-open.org/wss/oasis-wss-wssecurity-secext-1.1.xsd"
SAML2 = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XS = "http://www.w3.org/2001/XMLSchema"
HL7 = "urn:hl7-org:v3"
XCPD = "urn:ihe:iti:xcpd:2009"
XDSB = "urn:ihe:iti:xds-b:2007"
XDSI = "urn:ihe:rad:xdsi-b:2009"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
QUERY = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"


def q(ns: str, local: str) -> str:
    """Clark notation ``{ns}local`` as lxml uses it."""
    return f"{{{ns}}}{local}"


def local(el: object) -> str:
    """An lxml element's local name (its tag without ``{namespace}``); ``""`` for comments and processing
    instructions. A string operation: ``etree.QName(el).localname`` builds an object per call, which showed
    in the profile of parsing a 400-instance request."""
    tag = getattr(el, "tag", None)
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""
