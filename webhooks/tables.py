"""Webhook delivery tables (filled in by the webhooks package)."""
