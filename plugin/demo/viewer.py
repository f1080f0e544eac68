"""OHIF Viewer for ``radgate demo --viewer``: its prebuilt files and Orthanc's DICOMweb on one origin.

One small Starlette app serves OHIF's ``dist/`` (installed into ``.ohif/`` by scripts/setup.sh) at the
site root, with ``index.html`` for every other path (OHIF routes such as ``/viewer`` live in the
browser), an ``app-config.js`` written here whose one data source is the same-origin ``/dicom-web``,
and ``/dicom-web/*`` passed through to the demo Orthanc's DICOMweb plugin (GET only). Why one origin:
docs/design.md, "The demo's viewer".
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from plugin.web.threaded import ThreadedServer

OHIF_DIR = Path(__file__).resolve().parents[2] / ".ohif"
"""Where scripts/setup.sh unpacks the npm package @ohif/app (its ``dist/`` and ``VERSION``)."""

DICOMWEB_PATH = "/dicom-web"
_FORWARDED_REQUEST = ("accept", "range", "if-none-match", "if-modified-since")
_FORWARDED_RESPONSE = ("content-type", "content-length", "content-range", "etag", "last-modified")


class ViewerError(RuntimeError):
    """OHIF is not installed, or the viewer's server did not start."""


def ohif_dist(root: Path = OHIF_DIR) -> Path:
    """The folder holding OHIF's ``index.html``; ViewerError naming the fix when it is absent."""
    dist = root / "dist"
    if not (dist / "index.html").is_file():
        raise ViewerError(f"OHIF Viewer is not installed in {root}: run scripts/setup.sh")
    return dist


def app_config() -> str:
    """OHIF's ``window.config``: one DICOMweb data source, the same-origin ``/dicom-web`` (Orthanc)."""
    config: dict[str, Any] = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showLoadingIndicator": True,
        "showCPUFallbackMessage": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "radgate-demo",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "radgate-demo",
                "configuration": {
                    "friendlyName": "radgate demo Orthanc",
                    "name": "orthanc",
                    "wadoUriRoot": DICOMWEB_PATH,
                    "qidoRoot": DICOMWEB_PATH,
                    "wadoRoot": DICOMWEB_PATH,
                    "qidoSupportsIncludeField": True,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class _SinglePageApp(StaticFiles):
    """OHIF's files; any path that is not one of them gets ``index.html`` (the app routes in the browser)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            if exc.status_code != 404:
                raise
            return await super().get_response("index.html", scope)


def create_app(dicomweb_url: str, dist: Path) -> Starlette:
    """The viewer's ASGI app: OHIF from ``dist``, ``/dicom-web/*`` proxied to ``dicomweb_url`` (GET only).

    A path with a ``..`` segment under ``/dicom-web`` is answered 400 (only DICOMweb is passed through);
    an unreachable Orthanc gives 502. The upstream sees the browser's ``Host`` in a ``Forwarded`` header,
    so the bulk-data URLs in its metadata point back at this origin.
    """
    upstream = dicomweb_url.rstrip("/")
    clients: list[httpx.AsyncClient] = []

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0)) as client:
            clients.append(client)
            yield

    async def config_js(_request: Request) -> Response:
        return Response(
            app_config(), media_type="application/javascript", headers={"Cache-Control": "no-store"}
        )

    async def proxy(request: Request) -> Response:
        path = request.path_params["path"]
        if ".." in path.split("/"):
            return PlainTextResponse("only DICOMweb paths are served here", status_code=400)
        headers = {k: v for k in _FORWARDED_REQUEST if (v := request.headers.get(k)) is not None}
        headers["Forwarded"] = f"host={request.headers.get('host', '')};proto={request.url.scheme}"
        url = httpx.URL(f"{upstream}/{path}", query=request.url.query.encode())
        client = clients[0]
        try:
            answer = await client.send(client.build_request("GET", url, headers=headers), stream=True)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"Orthanc's DICOMweb did not answer: {exc}", status_code=502)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers={k: v for k in _FORWARDED_RESPONSE if (v := answer.headers.get(k)) is not None},
            background=BackgroundTask(answer.aclose),
        )

    return Starlette(
        routes=[
            Route("/app-config.js", config_js),
            Route(f"{DICOMWEB_PATH}/{{path:path}}", proxy, methods=["GET"]),
            Mount("/", app=_SinglePageApp(directory=dist, html=True)),
        ],
        lifespan=lifespan,
    )


class ViewerServer:
    """The viewer app on ``host:port`` (0: a free port) in a thread; ``start()``/``stop()``, ``url``."""

    def __init__(self, dicomweb_url: str, host: str = "127.0.0.1", port: int = 0, dist: Path | None = None):
        app = create_app(dicomweb_url, dist if dist is not None else ohif_dist())
        self._server = ThreadedServer(app, host, port, "radgate-viewer", lifespan="on")

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def url_template(self) -> str:
        """OHIF's basic viewer on the study ``{study_uid}`` (the form of ``web.viewer_url_template``)."""
        return f"{self.url}/viewer?StudyInstanceUIDs={{study_uid}}"

    def study_url(self, study_uid: str) -> str:
        """OHIF's basic viewer on one study."""
        return self.url_template.replace("{study_uid}", study_uid)

    def start(self, timeout: float = 10.0) -> ViewerServer:
        """Serve; returns once uvicorn serves (ViewerError if it does not within ``timeout``)."""
        try:
            self._server.start(timeout)
        except TimeoutError as exc:
            raise ViewerError(str(exc)) from None
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.stop()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
