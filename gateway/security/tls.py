"""TLS contexts for mutual authentication (IHE ATNA Secure Node, BCP 195).

Server: TLS 1.2 or newer, a client certificate chaining to ``[server].client_ca`` is required —
the handshake fails before any HTTP byte is read, so an unauthenticated caller never reaches
application code. Client: presents our certificate and verifies the partner's server certificate
(chain and host name) against the configured trust anchors.
"""

from __future__ import annotations

import ssl
from pathlib import Path

#: TLS 1.2 cipher suites allowed by BCP 195 / the IHE ATNA STX "TLS 1.2 floor" option: forward-secret
#: AEAD only. TLS 1.3 suites are all acceptable and are configured by OpenSSL itself.
BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def server_context(certificate: Path, private_key: Path, client_ca: Path) -> ssl.SSLContext:
    """A server context that *requires* a client certificate issued under ``client_ca``."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(str(certificate), str(private_key))
    ctx.load_verify_locations(cafile=str(client_ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT if hasattr(ssl, "VERIFY_X509_STRICT") else 0
    return ctx


def client_context(certificate: Path | None, private_key: Path | None, ca: Path) -> ssl.SSLContext:
    """A client context presenting our certificate and verifying the partner against ``ca``."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if certificate is not None:
        ctx.load_cert_chain(str(certificate), str(private_key) if private_key else None)
    return ctx


def describe_tls_error(exc: BaseException) -> str:
    """A sentence an operator can act on for a failed handshake (used by clients and the CLI)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the partner's certificate was not accepted: {exc.verify_message} (check the CA bundle)"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        hints = {
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the partner requires a client certificate and we sent none",
            "SSLV3_ALERT_BAD_CERTIFICATE": "the partner rejected our client certificate",
            "TLSV1_ALERT_UNKNOWN_CA": "the partner does not trust the CA of our client certificate",
            "WRONG_VERSION_NUMBER": "the partner does not speak TLS on that port",
        }
        return hints.get(reason, f"TLS failure: {reason}")
    return str(exc)
