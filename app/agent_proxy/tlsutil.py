"""Self-signed certificates and keys for a proxy (and the reference peers)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(
    common_name: str, hostnames: list[str], days: int = 825, key_pem: bytes | None = None
) -> tuple[bytes, bytes]:
    """A self-signed server certificate for ``hostnames`` (names or IPs) and its key: a new
    P-256 key, or the one in ``key_pem`` (a renewal keeps the key).

    Returns (certificate PEM, private key PEM).
    """
    key = ec.generate_private_key(ec.SECP256R1()) if key_pem is None else load_key(key_pem)
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hostnames or [common_name]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # Both: the proxy's certificate may also serve as its client certificate
            # towards the upstream (upstream.client_cert).
            x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


class MaterialError(ValueError):
    """A certificate, key or secret that cannot be used; the message says why."""


def load_key(key_pem: bytes):
    try:
        return serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise MaterialError(f"not an unencrypted PEM private key ({exc})") from None


def load_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise MaterialError(f"not a PEM certificate ({exc})") from None


def cert_names(cert: x509.Certificate) -> list[str]:
    """The certificate's subjectAltName entries (DNS names and IPs), in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san if isinstance(name, (x509.DNSName, x509.IPAddress))]


def names_host(names: list[str], host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is among ``names``, compared as
    certificate names are: case-insensitively, IPv6 in any notation."""
    return _canonical(host) in {_canonical(n) for n in names}


def same_key(cert: x509.Certificate, key) -> bool:
    """Whether ``key`` is the private key of ``cert``'s public key."""
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def check_pair(cert_pem: bytes, key_pem: bytes, hostnames: list[str], now: datetime.datetime | None = None) -> None:
    """Raise MaterialError unless the key belongs to the certificate, the certificate is
    valid at ``now`` and it names every one of ``hostnames``."""
    cert, key = load_cert(cert_pem), load_key(key_pem)
    if not same_key(cert, key):
        raise MaterialError("the key does not belong to the certificate")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise MaterialError(
            f"the certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now"
        )
    names = cert_names(cert)
    missing = [h for h in hostnames if not names_host(names, h)]
    if missing:
        raise MaterialError(f"the certificate does not name {', '.join(missing)} (it names {', '.join(names) or 'nothing'})")


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower().rstrip(".")


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint, colon-separated hex, as `openssl x509 -fingerprint -sha256` prints it."""
    return fingerprint_der(x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER))


def fingerprint_der(cert_der: bytes) -> str:
    """The same fingerprint for a certificate in DER, as a TLS peer presents it."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(cert_der).digest())


def not_after(path: str) -> float | None:
    """When the first certificate in the PEM file ``path`` expires (Unix time); None if unreadable."""
    try:
        with open(path, "rb") as handle:
            cert = x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()
