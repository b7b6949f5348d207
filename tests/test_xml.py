"""Hardened XML parsing: hostile documents are refused with specific faults, quickly."""

from __future__ import annotations

import pytest
from lxml import etree

from gateway.errors import XIG_FORBIDDEN_XML, XIG_MALFORMED, XIG_TOO_LARGE, SoapFault
from gateway.soap import ns, xml

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol9 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
]>
<lolz>&lol9;</lolz>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE foo [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
<foo>&xxe;</foo>"""

XXE_COMMENT_FIRST = b"""<?xml version="1.0"?><!-- hello --><!DOCTYPE foo SYSTEM "http://example.invalid/x.dtd"><foo/>"""


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, XXE, XXE_COMMENT_FIRST], ids=["billion-laughs", "xxe", "ext-dtd"])
def test_dtds_are_refused(doc: bytes) -> None:
    with pytest.raises(SoapFault) as exc:
        xml.parse(doc)
    assert exc.value.subcode == XIG_FORBIDDEN_XML
    assert exc.value.code == "Sender"


def test_passwd_never_appears_even_if_dtd_check_were_bypassed() -> None:
    # defence in depth: the parser itself neither loads nor resolves entities
    from lxml import etree

    root = etree.fromstring(XXE, parser=xml._parser())
    assert "root:" not in (root.text or "")


def test_depth_limit() -> None:
    doc = b"<a>" * 200 + b"</a>" * 200
    with pytest.raises(SoapFault) as exc:
        xml.parse(doc, max_depth=128)
    assert exc.value.subcode == XIG_FORBIDDEN_XML
    assert "deeper" in exc.value.reason
    assert xml.parse(b"<a>" * 100 + b"</a>" * 100, max_depth=128).tag == "a"


@pytest.mark.parametrize("depth", [127, 128, 129])
def test_depth_limit_is_exact_and_holds_for_any_branch(depth: int) -> None:
    """``depth`` levels in the last branch of a wide document (text, comments and siblings around it)."""
    deep = b"<b>x<!-- c -->" * (depth - 2) + b"<c/>" + b"</b>" * (depth - 2)
    doc = b"<a>" + b"<s><t/></s>" * 50 + deep + b"</a>"
    if depth <= 128:
        assert xml.parse(doc, max_depth=128).tag == "a"
    else:
        with pytest.raises(SoapFault) as exc:
            xml.parse(doc, max_depth=128)
        assert "deeper than 128" in exc.value.reason


def test_size_limit_is_413() -> None:
    with pytest.raises(SoapFault) as exc:
        xml.parse(b"<a>" + b"x" * 2000 + b"</a>", max_bytes=1000)
    assert exc.value.subcode == XIG_TOO_LARGE
    assert exc.value.status == 413


@pytest.mark.parametrize("doc", [b"", b"   ", b"not xml at all", b"<a><b></a>", b"\x00\x01\x02"])
def test_malformed(doc: bytes) -> None:
    with pytest.raises(SoapFault) as exc:
        xml.parse(doc)
    assert exc.value.subcode == XIG_MALFORMED


def test_processing_instruction_and_comment_prolog_ok() -> None:
    root = xml.parse(b'<?xml version="1.0" encoding="UTF-8"?>\n<!-- c --><?pi x?><r a="1"/>')
    assert root.get("a") == "1"


def test_local_names() -> None:
    root = etree.fromstring(b'<a:x xmlns:a="urn:a"><y/><!-- c --><?p i?><a:z/></a:x>')
    assert [ns.local(el) for el in root.iter()] == ["x", "y", "", "", "z"]
