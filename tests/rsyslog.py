"""A real rsyslogd on loopback as the audit record repository of the tests (Debian ``rsyslog`` +
``rsyslog-gnutls``).

It listens with RFC 5425 (imtcp, gtls stream driver, mutual authentication: our client certificate must
chain to ``client_ca``) and RFC 5426 (imudp), and writes every message it receives as one JSON line holding
the raw message exactly as received (``rawmsg``: no control-character escaping, UTF-8 and BOM kept), so a
test can parse each frame again. Ports stay the same across :meth:`Rsyslog.restart`. Start and stop wait
for real conditions with a deadline (the port accepts, a probe datagram was written, the process exited),
never for a fixed time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.audit import syslog

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
PROBE_MSGID = "xig-probe"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Received:
    """One message as rsyslog received it: the input (``tls`` / ``udp``) and the raw RFC 5424 bytes."""

    input: str
    raw: bytes

    def parsed(self) -> syslog.SyslogMessage:
        return syslog.parse(self.raw)


class Rsyslog:
    """One rsyslogd process (``start`` / ``stop`` / ``kill`` / ``restart``), its config in ``directory``."""

    def __init__(self, directory: Path, *, certificate: Path, private_key: Path, client_ca: Path,
                 auth_mode: str = "x509/certvalid", tls_port: int | None = None, udp_port: int | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "work").mkdir(exist_ok=True)
        self.tls_port = tls_port or free_port(socket.SOCK_STREAM)
        self.udp_port = udp_port or free_port(socket.SOCK_DGRAM)
        self.output = directory / "received.jsonl"
        self.pidfile = directory / "rsyslogd.pid"
        self.logfile = directory / "rsyslogd.log"
        self.conf = directory / "rsyslog.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self._probes = 0
        self.conf.write_text(f"""
global(workDirectory="{directory / 'work'}" maxMessageSize="256k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{client_ca}"
       defaultNetstreamDriverCertFile="{certificate}"
       defaultNetstreamDriverKeyFile="{private_key}"
       parser.escapeControlCharactersOnReceive="off")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="{auth_mode}"
       maxSessions="100")
input(type="imtcp" address="127.0.0.1" port="{self.tls_port}" name="tls")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{self.udp_port}" name="udp")
template(name="xigraw" type="list") {{
  constant(value="{{\\"input\\":\\"") property(name="inputname")
  constant(value="\\",\\"raw\\":\\"") property(name="rawmsg" format="json") constant(value="\\"}}\\n")
}}
action(type="omfile" file="{self.output}" template="xigraw")
""")

    # -- process control ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> Rsyslog:
        assert not self.running, "rsyslogd is already running"
        self.pidfile.unlink(missing_ok=True)
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        self._until(lambda: self.pidfile.exists() and self._accepts(), deadline, "the TLS port to accept")
        self._probes += 1
        marker = f"ready-{os.getpid()}-{self._probes}".encode()
        probe = b"<13>1 - - xig-test - " + PROBE_MSGID.encode() + b" - " + marker
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            def probed() -> bool:
                udp.sendto(probe, ("127.0.0.1", self.udp_port))  # UDP may drop it: send until one arrives
                return any(r.raw == probe for r in self.received(include_probes=True))
            self._until(probed, deadline, "a probe datagram to be written")
        return self

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.tls_port), timeout=1.0):
                return True
        except OSError:
            return False

    def _until(self, condition: Callable[[], bool], deadline: float, what: str) -> None:
        """Poll a real condition (rsyslogd offers no event to wait on) until ``deadline``."""
        while not condition():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rsyslogd: timed out waiting for {what}: {self.log()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then wait until the process has exited (it flushes what it read to the output file)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
                raise
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the process stops reading, its kernel still accepts (and acknowledges) TCP data."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL (also of a paused process): whatever it had not read or written is lost."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> Rsyslog:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""

    # -- what arrived -------------------------------------------------------------------------------

    def received(self, *, include_probes: bool = False) -> list[Received]:
        """Every message written so far (a line still being written is left for the next call)."""
        if not self.output.exists():
            return []
        out: list[Received] = []
        data = self.output.read_bytes()
        for line in data.split(b"\n")[:-1]:
            record = json.loads(line)
            raw = record["raw"].encode("utf-8", "surrogateescape")
            if include_probes or f" {PROBE_MSGID} ".encode() not in raw[:120]:
                out.append(Received(record["input"], raw))
        return out

    def audit_messages(self) -> list[syslog.SyslogMessage]:
        """The received messages with MSGID ``IHE+RFC-3881``, parsed."""
        return [m for m in (r.parsed() for r in self.received()) if m.msgid == syslog.MSGID]

    def wait_for(self, condition: Callable[[list[Received]], bool], timeout: float = 60.0) -> list[Received]:
        """Poll the output file (a file another process writes; no event to wait on) until ``condition``."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if condition(got):
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"rsyslog output never satisfied the condition ({len(got)} messages)")
            time.sleep(0.02)
