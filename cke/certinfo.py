"""What cke reads from a certificate: its serial, its validity, and who issued it.

The one place that parses the certificates cke finds on nodes and gets from Vault.
Issuers are told apart by key identifier: a CA's Subject Key Identifier equals the
Authority Key Identifier of every leaf it signs, so a leaf from a rotated CA is told
from one of the old CA even when both CAs carry the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding


@dataclass(frozen=True)
class CertInfo:
    """One certificate, as far as renewal and CA rotation need it."""

    serial: str  # lower-case hex
    not_before: float  # Unix time
    not_after: float  # Unix time
    issuer_key_id: str  # hex Authority Key Identifier ("" when the certificate has none)
    key_id: str = ""  # hex Subject Key Identifier (CAs; "" when absent)
    fingerprint: str = ""  # sha256 hex of the DER

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


class CertificateError(ValueError):
    """Not a PEM certificate (the message never carries the content)."""


def subject_key_id(cert: x509.Certificate) -> str:
    """The Subject Key Identifier, else the one RFC 5280 derives from the public key."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()


def authority_key_id(cert: x509.Certificate) -> str:
    try:
        ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return ""
    return ext.key_identifier.hex() if ext.key_identifier else ""


def info_of(cert: x509.Certificate) -> CertInfo:
    return CertInfo(
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        issuer_key_id=authority_key_id(cert),
        key_id=subject_key_id(cert),
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


def load_pem_certificates(data: bytes | str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; CertificateError when there is none or one is bad."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError:
        raise CertificateError("not a PEM certificate bundle") from None
    if not certs:
        raise CertificateError("no certificate in the PEM bundle")
    return certs


def parse_certificate(data: bytes | str) -> CertInfo:
    """The first certificate of a PEM text."""
    return info_of(load_pem_certificates(data)[0])


def bundle_key_ids(data: bytes | str) -> tuple[str, ...]:
    """The key identifiers of the CAs in a trust bundle, in file order."""
    return tuple(subject_key_id(c) for c in load_pem_certificates(data))


def join_bundle(*pems: str) -> str:
    """PEM texts joined into one bundle: each ends with one newline, duplicates dropped."""
    seen: list[str] = []
    for pem in pems:
        for cert in load_pem_certificates(pem):
            text = cert.public_bytes(Encoding.PEM).decode()
            if text not in seen:
                seen.append(text)
    return "".join(seen)
