"""A throwaway CA and certificates for a cluster on one machine (`dfs local up --tls`, tests).

Made with the `openssl` command, not a Python package: `cryptography` is not a dependency of
dfs (nor in its venv), and a development CA does not justify one; every Debian system that
runs `dfs` has `openssl` (Python's own `ssl` links the same library). Keys are EC P-256, valid
30 days; each certificate is good for both ends of a link (serverAuth and clientAuth) and names
the hosts it may serve on as SANs (IP addresses as IP SANs: `check_hostname` wants those).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

from dfs.errors import Code, DfsError

DAYS = "30"
OPENSSL_TIMEOUT = 30.0


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise DfsError(Code.UNAVAILABLE, "--tls needs the openssl command (apt-get install openssl)")
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True,
                       timeout=OPENSSL_TIMEOUT)
    except subprocess.CalledProcessError as e:
        last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise DfsError(Code.INTERNAL, f"openssl {args[0]} failed: {last[0]}") from None


def make_ca(directory: Path, name: str = "dfs local CA") -> Path:
    """DIR/ca.crt and DIR/ca.key (kept mode 0600), unless there already; returns ca.crt."""
    directory.mkdir(parents=True, exist_ok=True)
    crt = directory / "ca.crt"
    if not crt.exists():
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", DAYS,
                 "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
        os.chmod(directory / "ca.key", 0o600)
    return crt


def make_cert(directory: Path, name: str, hosts: list[str]) -> tuple[Path, Path]:
    """DIR/NAME.crt and DIR/NAME.key signed by DIR/ca.*, for `hosts`; returns (crt, key)."""
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    if crt.exists() and key.exists():
        return crt, key
    sans = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in dict.fromkeys(hosts))
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={sans}\n"
                   "basicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key.name, "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)
    os.chmod(key, 0o600)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", crt.name, "-days", DAYS, "-extfile", ext.name,
             cwd=directory)
    (directory / f"{name}.csr").unlink()
    ext.unlink()
    return crt, key


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def local_hosts(*addresses_hosts: str) -> list[str]:
    """The SANs of a local cluster's certificates: loopback by name and address, and any
    other host its addresses use."""
    return ["127.0.0.1", "localhost", *[h for h in addresses_hosts if h]]
