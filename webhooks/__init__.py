"""Standard Webhooks signing and verification, durable deliveries and the dispatcher."""
