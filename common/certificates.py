"""A CA file checked when it is named, not when the first TLS connection fails on it."""

from __future__ import annotations

from pathlib import Path

# The armours OpenSSL reads as certificates (X509 CERTIFICATE is the legacy one).
PEM_HEADERS = (
    b"-----BEGIN CERTIFICATE-----",
    b"-----BEGIN TRUSTED CERTIFICATE-----",
    b"-----BEGIN X509 CERTIFICATE-----",
)


def pem_certificates(path: Path) -> Path:
    """`path`, if it holds PEM certificates; else ValueError saying what it is not.

    librdkafka refused a DER file, a key or an empty file as it made its first client (a
    traceback, after the topics' checks), and gRPC as its first call's handshake failed; both
    read PEM only. Only the armour is looked for: what is inside is theirs to judge."""
    try:
        head = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror or exc}") from None
    if not any(header in head for header in PEM_HEADERS):
        raise ValueError(
            "holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' line): a DER file "
            "converts with `openssl x509 -inform der -in CA.der -out CA.pem`"
        )
    return path
