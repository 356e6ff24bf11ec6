"""The `inference-server` command."""
