"""Small helpers shared by the benchmarks: timing, a loopback gateway with test PKI, reporting."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from gateway.config import Config, load_config
from gateway.security.certs import CertSet, init_certs

FILESYSTEM_PACS = '[pacs]\nkind = "filesystem"\npath = "pacs"\n'


def gateway_toml(certs: CertSet, *, hcid: str = "urn:oid:2.999.1", port: int = 0, pacs: str = FILESYSTEM_PACS,
                 extra: str = "") -> str:
    """A benchmark gateway's configuration: ids derived from ``hcid`` (``.1`` assigning authority, ``.2``
    repository, ``.3`` imaging source), the test PKI, loopback ``port``; ``pacs`` and ``extra`` sections."""
    oid = hcid.removeprefix("urn:oid:")
    return f"""
[gateway]
home_community_id = "{hcid}"
assigning_authority = "{oid}.1"
repository_unique_id = "{oid}.2"
imaging_source_id = "{oid}.3"

[server]
listen = "127.0.0.1:{port}"
certificate = "{certs.gateway_cert}"
private_key = "{certs.gateway_key}"
client_ca = "{certs.ca_cert}"
shutdown_timeout = 5

[saml]
trusted_issuers = "{certs.ca_cert}"
signing_certificate = "{certs.partner_cert}"
signing_key = "{certs.partner_key}"

{pacs}
{extra}"""


@dataclass
class Result:
    name: str
    value: float
    reference: float
    unit: str
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.reference if self.reference else float("nan")


def workspace() -> tuple[Path, CertSet, Config]:
    d = Path(tempfile.mkdtemp(prefix="xig-bench-"))
    certs = init_certs(d / "pki")
    (d / "xig.toml").write_text(gateway_toml(certs))
    return d, certs, load_config(d / "xig.toml")


def best_of(n: int, fn: Callable[[], float]) -> float:
    """Best (highest) of ``n`` runs of ``fn`` returning a rate."""
    return max(fn() for _ in range(n))


def rate(count: float, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return count / (time.perf_counter() - t0)


def tree_cpu_seconds(pids: Iterable[int], *, recursive: bool = True) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each of ``pids`` and, with ``recursive``, their descendants."""
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for p in (root, *(root.children(recursive=True) if recursive else ())):
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    out[p.pid] = t.user + t.system
    return out


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, idle and I/O wait excluded)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def host_speed() -> str:
    """How fast this host is right now: a pure-Python loop (the interpreter: dict and str work, 300,000
    iterations) and one RSA-2048 PKCS#1 v1.5 SHA-256 signature (OpenSSL), each the median of 5 runs. The
    machine is a VM whose speed moves with its neighbours (the two do not always move together);
    figures of two runs compare only when these do."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    def python_loop() -> float:
        t0 = time.perf_counter()
        d: dict[int, str] = {}
        for i in range(300_000):
            d[i % 1000] = str(i)
        return (time.perf_counter() - t0) * 1000

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def signatures() -> float:
        t0 = time.perf_counter()
        for _ in range(50):
            key.sign(b"xig", padding.PKCS1v15(), hashes.SHA256())
        return (time.perf_counter() - t0) / 50 * 1000

    loop = sorted(python_loop() for _ in range(5))[2]
    sign = sorted(signatures() for _ in range(5))[2]
    return f"Python loop {loop:.1f} ms, RSA-2048 signature {sign:.3f} ms"
