"""The ASGI app for `uvicorn api.main:app`, built from the environment's settings."""

from api.app import create_app
from inference_server.settings import get_settings

app = create_app(get_settings())
