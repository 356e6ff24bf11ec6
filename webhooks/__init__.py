"""Standard Webhooks signing and verification, durable deliveries and the dispatcher.

Receivers need only ``verify``::

    from webhooks import verify
    event = verify(request_body_bytes, request_headers, "whsec_...")
"""

from webhooks.signing import WebhookVerificationError, sign, signature_header, verify

__all__ = ["WebhookVerificationError", "sign", "signature_header", "verify"]
