"""TLS failures in words, for checks over backend TLS and the ``tls`` check."""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.python.failure import Failure


def describe_tls_failure(reason: Failure) -> str | None:
    """Words for a connection that ended on a TLS error; None when it did not."""
    if reason.check(VerificationError):
        errors = getattr(reason.value, "errors", ())
        names = ", ".join(str(getattr(e, "mismatched_id", e)) for e in errors)
        return f"TLS certificate does not match the server name ({names})"
    if reason.check(SSL.Error):
        return f"TLS handshake failed: {openssl_reasons(reason.value)}"
    return None


def openssl_reasons(error: SSL.Error) -> str:
    """The reason strings of an OpenSSL error stack ("certificate verify failed")."""
    stack = error.args[0] if error.args else None
    if isinstance(stack, list):
        words = [str(entry[-1]) for entry in stack if isinstance(entry, tuple)]
        if words:
            return "; ".join(words)
    return str(error) or error.__class__.__name__
