"""The ASGI app for `uvicorn api.main:app`, built from the environment's settings."""

import logging

from api.app import create_app
from inference_server.logs import configure_logging
from inference_server.settings import get_settings

settings = get_settings()
if not logging.getLogger().handlers:
    # A process that did not start in the CLI (`api --workers N` spawns them, or plain uvicorn).
    configure_logging(settings.log_format, settings.log_level, role="api")
app = create_app(settings)
