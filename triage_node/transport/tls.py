"""SSL contexts for DICOM TLS (receiver and sender), TLS 1.2+ as BCP 195 asks."""

from __future__ import annotations

import ssl

from ..config import Destination, ReceiverConfig


def server_context(rc: ReceiverConfig) -> ssl.SSLContext | None:
    """The receiver's context, or None when TLS is not configured. A CA bundle turns on client verification."""
    if not (rc.tls_cert and rc.tls_key):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(rc.tls_cert, rc.tls_key)
    if rc.tls_ca:
        ctx.load_verify_locations(cafile=rc.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(dest: Destination) -> ssl.SSLContext | None:
    """The sender's context for a destination with ``tls = true`` (peer always verified)."""
    if not dest.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls_cert and dest.tls_key:
        ctx.load_cert_chain(dest.tls_cert, dest.tls_key)
    return ctx
