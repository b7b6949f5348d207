"""``xig demo``: a responding gateway on the embedded default, and a self-check that calls it.

Until the initiating side exists, the demo starts one community's responding gateway (embedded
filesystem store, test certificates from ``certs-example/``) and shows the security pipeline at
work over real mutual TLS: a signed request passes TLS, XUA and schema checks; an unsigned one
and a caller without a client certificate are refused with a clear reason.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from pathlib import Path

import httpx
from lxml import etree
from rich.console import Console

from gateway.config import Config, load_config
from gateway.resources import project_root
from gateway.security.certs import init_certs
from gateway.security.outbound import security_header
from gateway.security.tls import client_context
from gateway.soap import ns
from gateway.web.client import SoapClient, TransportError
from gateway.web.endpoints import XCA_QUERY
from gateway.web.server import BackgroundServer

FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"

DEMO_CONFIG = """\
# written by `xig demo` — a responding gateway on the embedded filesystem store
[gateway]
home_community_id = "urn:oid:2.999.1"
assigning_authority = "2.999.1.1"
repository_unique_id = "2.999.1.2"
imaging_source_id = "2.999.1.3"
name = "XIG Demo Community"

[server]
listen = "127.0.0.1:{port}"
certificate = "{certs}/gateway.crt"
private_key = "{certs}/gateway.key"
client_ca = "{certs}/ca.crt"

[saml]
trusted_issuers = "{certs}/ca.crt"
signing_certificate = "{certs}/partner.crt"
signing_key = "{certs}/partner.key"
organization = "XIG Demo Partner"

[pacs]
kind = "filesystem"
path = "pacs"

[database]
url = "sqlite:///xig.db"
"""


def find_documents_request(patient_id: str) -> etree._Element:
    """A minimal ITI-38 FindDocuments query (ITI TF-2 3.18.4.1.2.3.7.1)."""
    req = etree.Element(ns.q(ns.QUERY, "AdhocQueryRequest"), nsmap={"query": ns.QUERY, "rim": ns.RIM})
    etree.SubElement(req, ns.q(ns.QUERY, "ResponseOption"), returnComposedObjects="true", returnType="LeafClass")
    query = etree.SubElement(req, ns.q(ns.RIM, "AdhocQuery"), id=FIND_DOCUMENTS)
    for name, value in (("$XDSDocumentEntryPatientId", f"'{patient_id}'"),
                        ("$XDSDocumentEntryStatus", "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')")):
        slot = etree.SubElement(query, ns.q(ns.RIM, "Slot"), name=name)
        etree.SubElement(etree.SubElement(slot, ns.q(ns.RIM, "ValueList")), ns.q(ns.RIM, "Value")).text = value
    return req


def _certs_dir(workdir: Path) -> Path:
    example = project_root() / "certs-example"
    if (example / "ca.crt").exists():
        return example
    return init_certs(workdir / "certs").directory


def _free(port: int) -> int:
    if port == 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def prepare(workdir: Path, port: int) -> Config:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "pacs").mkdir(exist_ok=True)
    certs = _certs_dir(workdir).resolve()
    cfg_path = workdir / "xig.toml"
    cfg_path.write_text(DEMO_CONFIG.format(port=_free(port), certs=certs))
    return load_config(cfg_path)


async def self_check(cfg: Config, url: str, console: Console) -> bool:
    certs_ok = True
    partner_tls = client_context(cfg.saml.signing_certificate, cfg.saml.signing_key, cfg.server.client_ca)
    async with httpx.AsyncClient(verify=partner_tls) as http:
        health = (await http.get(f"{url}/health")).json()
        console.print(f"[green]✓[/] GET {url}/health → {health['status']}, community {health['home_community_id']}")
        wsdl = await http.get(f"{url}{XCA_QUERY.path}?wsdl")
        console.print(f"[green]✓[/] GET {url}{XCA_QUERY.path}?wsdl → {len(wsdl.content)} bytes of IHE WSDL")
    async with SoapClient(partner_tls) as client:
        endpoint = url + XCA_QUERY.path
        body = find_documents_request("PAT-1^^^&2.999.1.1&ISO")
        reply = await client.call(endpoint, body, XCA_QUERY.request_action,
                                  security=security_header(cfg, endpoint))
        if reply.fault is not None and "not enabled" in reply.fault.reason:
            console.print("[green]✓[/] signed ITI-38 request: mutual TLS, XUA signature, WS-Addressing and "
                          "XSD checks passed; the query service itself arrives with the responding gateway")
        elif reply.fault is not None:
            console.print(f"[red]✗[/] signed ITI-38 request refused: {reply.fault}")
            certs_ok = False
        else:
            console.print(f"[green]✓[/] signed ITI-38 request answered: {etree.QName(reply.body).localname}")
        reply = await client.call(endpoint, find_documents_request("PAT-1^^^&2.999.1.1&ISO"),
                                  XCA_QUERY.request_action)
        ok = reply.fault is not None and reply.fault.subcode is not None
        console.print(f"[{'green' if ok else 'red'}]{'✓' if ok else '✗'}[/] request without an assertion → "
                      f"{reply.fault.subcode if reply.fault else 'accepted?!'}: "
                      f"{reply.fault.reason if reply.fault else ''}")
        certs_ok &= ok
    anonymous = ssl.create_default_context(cafile=str(cfg.server.client_ca))
    async with SoapClient(anonymous) as client:
        try:
            await client.call(url + XCA_QUERY.path, find_documents_request("x"), XCA_QUERY.request_action)
            console.print("[red]✗[/] a caller without a client certificate was let in")
            certs_ok = False
        except TransportError as exc:
            console.print(f"[green]✓[/] caller without a client certificate refused at TLS: {exc}")
    return certs_ok


def how_to_call(cfg: Config, url: str) -> str:
    c = cfg.saml.signing_certificate.parent
    tls = f"--cacert {c}/ca.crt --cert {c}/partner.crt --key {c}/partner.key"
    return (f"Call it (any client certificate issued by {c}/ca.crt):\n"
            f"  curl {tls} {url}/health\n"
            f"  curl {tls} '{url}/ihe/xcpd?wsdl'\n"
            f"SOAP endpoints (signed XUA assertion required): {url}/ihe/xcpd, /ihe/xca/query, "
            f"/ihe/xca/retrieve, /ihe/xcai/retrieve")


async def run_demo(workdir: Path, port: int, serve_after: bool, console: Console) -> int:
    cfg = prepare(workdir, port)
    console.rule("XIG demo — responding gateway on the embedded default")
    server = BackgroundServer(cfg).start()
    try:
        console.print(f"gateway for community {cfg.gateway.home_community_id} listening on {server.url} "
                      f"(config {workdir / 'xig.toml'})")
        ok = await self_check(cfg, server.url, console)
        console.print(how_to_call(cfg, server.url), soft_wrap=True)
        if serve_after and ok:
            console.print("serving — press Ctrl-C to stop")
            try:
                await asyncio.Event().wait()  # until Ctrl-C cancels the demo
            except (KeyboardInterrupt, asyncio.CancelledError):
                pass
        return 0 if ok else 1
    finally:
        server.stop()
        if not any((workdir / "pacs").iterdir()):
            shutil.rmtree(workdir / "pacs", ignore_errors=True)
