"""A CA file checked when it is named, not when the first TLS connection fails on it."""

from __future__ import annotations

from pathlib import Path

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
PEM_TRUSTED_CERTIFICATE = b"-----BEGIN TRUSTED CERTIFICATE-----"


def pem_certificates(path: Path) -> Path:
    """`path`, if it holds PEM certificates; else ValueError saying what it is not.

    librdkafka refused a DER file, a key or an empty file as it made its first client (a
    traceback, after the topics' checks), and gRPC as its first call's handshake failed; both
    read PEM only. Only the armour is looked for: what is inside is theirs to judge."""
    try:
        head = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror or exc}") from None
    if PEM_CERTIFICATE not in head and PEM_TRUSTED_CERTIFICATE not in head:
        raise ValueError(
            "holds no PEM certificate (no '-----BEGIN CERTIFICATE-----' line): a DER file "
            "converts with `openssl x509 -inform der -in CA.der -out CA.pem`"
        )
    return path
