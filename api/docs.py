"""``/openapi.json`` and ``/docs``.

Swagger UI is served from the ``swagger-ui-bundle-v2`` package, so the page works on a machine
without internet (FastAPI's default loads it from a CDN). With ``DOCS_REQUIRE_KEY`` (the default
when ``ENVIRONMENT=production``) both need an API key, like every other route but the probes: the
document maps the whole API, which a public deployment need not hand to anyone who asks."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from api import openapi
from api.deps import current_tenant

ASSETS = "/docs/assets"
OPENAPI_URL = "/openapi.json"


def install_docs(app: FastAPI, *, require_key: bool) -> None:
    """Serve the document and the page; ``app`` must be built with ``docs_url=None`` and
    ``openapi_url=None``. The static Swagger UI files stay public: they are the package's own."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")
    guard = [Depends(current_tenant)] if require_key else []
    static: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        if not static:
            static.update(openapi.build(app))
        return static

    app.openapi = document  # type: ignore[method-assign]

    @app.get(OPENAPI_URL, include_in_schema=False, dependencies=guard)
    async def openapi_document(request: Request) -> JSONResponse:
        return JSONResponse(openapi.served(document(), request.app.state.inference.ctx.registry))

    @app.get("/docs", include_in_schema=False, dependencies=guard)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
