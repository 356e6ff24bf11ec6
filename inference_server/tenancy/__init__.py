"""Tenants: their settings and limits, their API keys, and what they used (shared by the CLI and the
admin API, so both change a tenant the same way)."""
