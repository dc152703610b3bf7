"""`/docs` (Swagger UI) and `/redoc` (ReDoc) that work with no internet: their scripts and styles come from this
server, not from a CDN.

FastAPI's built-in pages load Swagger UI and ReDoc from cdn.jsdelivr.net (and a favicon from fastapi.tiangolo.com),
so on an offline machine or a LAN without internet `/docs` stays blank. The assets are taken from the
`fastapi-offline` package (MIT; it ships swagger-ui-dist 5 and ReDoc 2 as plain files and needs nothing but
FastAPI). Swagger UI 5 is needed because FastAPI writes OpenAPI 3.1, which Swagger UI 4 (the `swagger-ui-bundle`
package) refuses to render. Only the files are used; the pages come from FastAPI's own HTML helpers.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSET_PACKAGE = "fastapi_offline"
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")

# Swagger UI's default `validatorUrl` is validator.swagger.io: its badge would send this server's spec URL there.
SWAGGER_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
# Both pages may load only from this server (their inline bootstrap scripts, data: icons and blob: workers
# included). This also stops ReDoc's attribution logo, which it fetches from cdn.redoc.ly (hidden when it fails).
CONTENT_SECURITY_POLICY = "default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:"


def asset_dir() -> Path:
    """The folder holding Swagger UI's and ReDoc's files; a clear error when the package or a file is missing."""
    try:
        folder = Path(str(importlib.resources.files(ASSET_PACKAGE) / "static"))
    except ModuleNotFoundError:
        raise RuntimeError(
            f"/docs needs the {ASSET_PACKAGE.replace('_', '-')!r} package for Swagger UI's files: "
            "pip install fastapi-offline (a dependency of lcmkit)"
        ) from None
    missing = [name for name in ASSET_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"/docs: {folder} lacks {', '.join(missing)}; reinstall fastapi-offline")
    return folder


def _local_only(page: HTMLResponse) -> HTMLResponse:
    """The page, with a policy that lets the browser load nothing from any other host."""
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add `docs_url` and `redoc_url` to an app built with `docs_url=None, redoc_url=None`, serving the assets
    under `ASSETS_URL`. URLs honour the ASGI `root_path`, so the pages also work behind a path prefix."""
    app.mount(ASSETS_URL, StaticFiles(directory=asset_dir()), name="docs-assets")
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url
    parameters = {**SWAGGER_PARAMETERS, **(app.swagger_ui_parameters or {})}

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return root + (app.openapi_url or "/openapi.json"), root + ASSETS_URL

    @app.get(docs_url, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        spec, assets = urls(request)
        return _local_only(
            get_swagger_ui_html(
                openapi_url=spec,
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                swagger_css_url=f"{assets}/swagger-ui.css",
                swagger_favicon_url=f"{assets}/favicon.png",
                oauth2_redirect_url=oauth2_redirect_url,
                swagger_ui_parameters=parameters,
            )
        )

    if oauth2_redirect_url:

        @app.get(oauth2_redirect_url, include_in_schema=False)
        def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        spec, assets = urls(request)
        return _local_only(
            get_redoc_html(
                openapi_url=spec,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{assets}/redoc.standalone.js",
                redoc_favicon_url=f"{assets}/favicon.png",
                with_google_fonts=False,
            )
        )
