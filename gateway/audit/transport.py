"""Syslog connections to an audit record repository (adapters: real sockets).

* :class:`TlsConnection` — RFC 5425: octet-counted RFC 5424 messages over mutually authenticated TLS
  (our client certificate, the repository verified against its CA and host name; TLS 1.2+, BCP 195
  ciphers: :func:`gateway.security.tls.client_context`). Closed with a TLS ``close_notify`` (RFC 5425 4.4).
* :class:`UdpConnection` — RFC 5426: one message per datagram, never larger than UDP can carry
  (65507 octets over IPv4, 65527 over IPv6; RFC 5426 3.2). Such a message is refused with
  :class:`FrameTooLarge` — it can never be sent over UDP, so the caller marks it failed for that repository
  instead of retrying it forever. RFC 5426 also says receivers need only accept 480 (SHOULD 2048) octets:
  use TLS for audit messages of any size.

Neither RFC gives the sender an acknowledgement, so a connection offers the two facts the delivery thread
uses to decide that what it wrote arrived (see :mod:`gateway.audit.trail`): :meth:`unacknowledged` — bytes
the peer's TCP has not acknowledged yet (Linux ``SIOCOUTQ``) — and :meth:`healthy` — the peer has not
closed, reset or alerted the connection (a syslog receiver never sends data, so anything readable is a
close, a TLS alert or a reset; for UDP, an ICMP "port unreachable" reported by the socket).
"""

from __future__ import annotations

import errno
import fcntl
import select
import socket
import ssl
import struct
import termios
from pathlib import Path
from typing import Protocol

from gateway.audit.syslog import UDP_MAX_IPV4, UDP_MAX_IPV6, octet_count
from gateway.config import AuditRepository, Config
from gateway.security.tls import client_context, describe_tls_error

#: seconds for connecting, the TLS handshake and each write
CONNECT_TIMEOUT = 10.0


class TransportError(Exception):
    """The repository cannot be reached or the connection broke; the text is for operators."""


class FrameTooLarge(TransportError):
    """The message can never be sent over this transport (larger than a UDP datagram)."""


class SyslogConnection(Protocol):
    """One open connection to a repository."""

    def send(self, message: bytes) -> None:
        """Write one RFC 5424 message (framed as the transport requires); raises :class:`TransportError`."""

    def unacknowledged(self) -> int | None:
        """Bytes written but not yet acknowledged by the peer (None when the transport cannot tell)."""

    def healthy(self) -> bool:
        """False when the peer closed, reset or refused the connection (then :attr:`error` says why)."""

    @property
    def error(self) -> str | None: ...

    def close(self) -> None: ...


def repository_key(repo: AuditRepository) -> str:
    """The name a repository's delivery state is kept under: its ``name``, else ``transport://host:port``."""
    return repo.name or f"{repo.transport}://{repo.host}:{repo.port}"


def _describe(exc: BaseException, where: str) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"{where}: its certificate was not accepted: {exc.verify_message} (check [[audit.repositories]] "
                "ca, else [client] ca / [server] client_ca)")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return f"{where} closed the connection"
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {where} failed: {describe_tls_error(exc)}"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where} refused the connection (is the audit repository running?)"
    if isinstance(exc, socket.timeout | TimeoutError):
        return f"{where} did not answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {where}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{where}: {exc.strerror or errno.errorcode.get(exc.errno, exc.errno)}"
    return f"{where}: {exc}"


def _outq(sock: socket.socket) -> int | None:
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))  # = SIOCOUTQ on sockets
    except (OSError, ValueError):
        return None
    value: int = struct.unpack("i", raw)[0]
    return value


class TlsConnection:
    """RFC 5425: octet-counted RFC 5424 messages over mutual TLS."""

    def __init__(self, sock: ssl.SSLSocket, where: str) -> None:
        self.sock = sock
        self.where = where
        self._error: str | None = None

    @classmethod
    def open(cls, host: str, port: int, context: ssl.SSLContext, *, timeout: float = CONNECT_TIMEOUT) -> TlsConnection:
        where = f"audit repository {host}:{port}"
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise TransportError(_describe(exc, where)) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise TransportError(_describe(exc, where)) from None
        return cls(sock, where)

    @property
    def error(self) -> str | None:
        return self._error

    def send(self, message: bytes) -> None:
        try:
            self.sock.sendall(octet_count(message))
        except (OSError, ssl.SSLError) as exc:
            self._error = _describe(exc, self.where)
            raise TransportError(self._error) from None

    def unacknowledged(self) -> int | None:
        return _outq(self.sock)

    def healthy(self) -> bool:
        if self._error is not None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError) as exc:
            self._error = _describe(exc, self.where)
            return False
        if not readable and not self.sock.pending():
            return True
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    self._error = f"{self.where} closed the connection"
                    return False
                # a syslog receiver sends nothing (RFC 5425 4.3); ignore anything it does send
        except ssl.SSLWantReadError:
            return True  # only TLS records of its own (e.g. TLS 1.3 session tickets)
        except (OSError, ssl.SSLError) as exc:
            self._error = _describe(exc, self.where)
            return False
        finally:
            try:
                self.sock.settimeout(CONNECT_TIMEOUT)
            except OSError:
                pass

    def close(self) -> None:
        try:
            if self._error is None:
                self.sock.settimeout(1.0)
                self.sock.unwrap()  # close_notify (RFC 5425 4.4)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            self.sock.close()


class UdpConnection:
    """RFC 5426: one RFC 5424 message per datagram."""

    def __init__(self, sock: socket.socket, where: str, max_datagram: int) -> None:
        self.sock = sock
        self.where = where
        self.max_datagram = max_datagram
        self._error: str | None = None

    @classmethod
    def open(cls, host: str, port: int) -> UdpConnection:
        where = f"audit repository udp://{host}:{port}"
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise TransportError(_describe(exc, where)) from None
        try:
            sock.connect(address)  # a connected socket reports ICMP port unreachable as ECONNREFUSED
        except OSError as exc:
            sock.close()
            raise TransportError(_describe(exc, where)) from None
        return cls(sock, where, UDP_MAX_IPV6 if family == socket.AF_INET6 else UDP_MAX_IPV4)

    @property
    def error(self) -> str | None:
        return self._error

    def send(self, message: bytes) -> None:
        if len(message) > self.max_datagram:
            raise FrameTooLarge(f"{len(message)} octets do not fit in one UDP datagram (at most {self.max_datagram}; "
                                "RFC 5426 3.2) — use a TLS repository for this message")
        try:
            self.sock.send(message)
        except OSError as exc:
            self._error = _describe(exc, self.where)
            raise TransportError(self._error) from None

    def unacknowledged(self) -> int | None:
        return None

    def healthy(self) -> bool:
        if self._error is not None:
            return False
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._error = _describe(OSError(code, errno.errorcode.get(code, str(code))), self.where)
            if code == errno.ECONNREFUSED:
                self._error = f"{self.where} is not listening (ICMP port unreachable)"
            return False
        return True

    def close(self) -> None:
        self.sock.close()


class Connector:
    """Opens connections to one configured repository (the TLS context is built on first use)."""

    def __init__(self, repo: AuditRepository, config: Config) -> None:
        self.repo = repo
        self.config = config
        self._context: ssl.SSLContext | None = None

    def tls_context(self) -> ssl.SSLContext:
        """Our client certificate (the repository's ``certificate``/``private_key``, else ``[client]`` / the
        server identity) and the repository's CA (``ca``, else the client trust store)."""
        if self._context is None:
            repo, cfg = self.repo, self.config
            certificate: Path = repo.certificate or cfg.client_certificate
            key: Path | None = repo.private_key if repo.certificate else cfg.client_private_key
            try:
                self._context = client_context(certificate, key, repo.ca or cfg.client_trust)
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"cannot load the TLS files for audit repository {repository_key(repo)}: "
                                     f"{exc}") from None
        return self._context

    def __call__(self) -> SyslogConnection:
        if self.repo.transport == "udp":
            return UdpConnection.open(self.repo.host, self.repo.port)
        return TlsConnection.open(self.repo.host, self.repo.port, self.tls_context())
