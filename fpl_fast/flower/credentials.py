"""The credentials of a secure Flower deployment, made with the ``cryptography`` package: a CA and the SuperLink's
TLS certificate (``certs DIR``), and a SuperNode's authentication key pair (``node-key FILE``).

Flower 1.42 serves its Fleet, Control and Runtime APIs over HTTPS with ``flower-superlink --ssl-certfile
server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.pem``; SuperNodes and ``flwr`` verify it against the CA
(``flower-supernode --root-certificates ca.pem``, ``root-certificates`` in the connection's config.toml). With
``--enable-supernode-auth`` the SuperLink admits only SuperNodes whose public key was enrolled (``flwr supernode
register KEY.pub``): each Fleet request is signed with the node's private key (``flower-supernode
--auth-supernode-private-key KEY``), an OpenSSH EC key on a NIST curve.

Private keys are written 0600 (created so: never readable by others, not even briefly) and never overwritten: a
CA or a node key that exists is kept, so a second call cannot silently replace the credentials a federation uses.
The CA made here is for a test or a first deployment; an organisation with its own CA issues the server
certificate there instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA_CERT", "SERVER_CERT", "SERVER_KEY", "DEFAULT_HOSTS", "make_certs", "make_node_key", "superlink_tls_args"]

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")  # loopback: what the tests and a first try on one machine connect to
_CURVE = ec.SECP384R1  # P-384: the curve Flower's docs use for SuperNode keys; one curve for all keys here


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; an existing file is an error (never overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # the umask may only remove bits; say 0600 explicitly


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: keys are never overwritten "
            "(remove them first to make new ones, and enrol or distribute the new ones)"
        )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certs(folder: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 365) -> dict[str, Path]:
    """Write a CA (``ca.pem``, ``ca.key``) and a server certificate it signs (``server.pem``, ``server.key``) for
    ``hosts`` (IP addresses or DNS names the SuperLink is reached at) into ``folder``; keys 0600. Returns the
    paths by file name."""
    if not hosts:
        raise ValueError("give at least one host name or IP address for the server certificate")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    paths = {name: folder / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    _refuse_existing(*paths.values())
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fpl_fast federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(_CURVE())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(paths[CA_KEY], _pem_key(ca_key))
    _write_private(paths[SERVER_KEY], _pem_key(server_key))
    paths[CA_CERT].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[SERVER_CERT].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    return paths


def make_node_key(path: Path, comment: str = "fpl_fast supernode") -> tuple[Path, Path]:
    """Write a SuperNode's authentication key pair: ``path`` (OpenSSH private key, 0600, for
    ``flower-supernode --auth-supernode-private-key``) and ``path.pub`` (OpenSSH public key, for ``flwr supernode
    register``). Returns (private, public)."""
    public = path.with_name(path.name + ".pub")
    _refuse_existing(path, public)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_private(path, private)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(pub + f" {comment}\n".encode())
    return path, public


def superlink_tls_args(folder: Path) -> list[str]:
    """``flower-superlink``'s TLS options for the certificates ``make_certs(folder)`` wrote."""
    return [
        "--ssl-ca-certfile",
        str(folder / CA_CERT),
        "--ssl-certfile",
        str(folder / SERVER_CERT),
        "--ssl-keyfile",
        str(folder / SERVER_KEY),
    ]
