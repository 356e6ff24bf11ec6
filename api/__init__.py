"""The thin HTTP API: auth, validation, persistence, publish. It never imports torch or diffusers."""
