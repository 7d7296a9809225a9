"""The dashboard: a single-page app in plain JS modules (service/static/), plotly.js from the
installed plotly package, and the example specs as submit templates.

`/`, /static and plotly.min.js are served without a token: the page holds no secrets, and it
asks for the token the API needs. The examples sit under /api/v1 like the rest of the API.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

STATIC = Path(__file__).resolve().parents[2] / "static"
# A source checkout (or an editable install) has examples/ beside the packages; a wheel does
# not ship them, and the submit page then starts from an empty editor.
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
# find_spec locates the package without importing it (plotly's import is slow and unneeded).
PLOTLY_JS = Path(find_spec("plotly").origin).parent / "package_data" / "plotly.min.js"
CACHE = {"Cache-Control": "public, max-age=86400", "Vary": "Accept-Encoding"}
# The page may only talk to its own origin: no CDN, no network at run time. Plotly sets
# inline styles; the Ray dashboard is a plain link, which CSP does not restrict.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)
api = APIRouter(tags=["dashboard"])


class Example(BaseModel):
    name: str
    text: str  # the file as written, so the editor keeps its layout
    spec: dict[str, Any]


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)


@router.get("/")
def index() -> FileResponse:
    headers = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP}
    return FileResponse(STATIC / "index.html", headers=headers)


@lru_cache(maxsize=1)
def _plotly_gzip() -> bytes:
    return gzip.compress(PLOTLY_JS.read_bytes(), compresslevel=6)


@router.get("/static/vendor/plotly.min.js")
def plotly_js(request: Request) -> Response:
    """4.8 MB as it is, 1.4 MB gzipped (compressed once, then kept)."""
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers = CACHE | {"Content-Encoding": "gzip"}
        return Response(_plotly_gzip(), media_type="text/javascript", headers=headers)
    return FileResponse(PLOTLY_JS, media_type="text/javascript", headers=CACHE)


@api.get("/examples")
def examples() -> list[Example]:
    """The training specs in examples/, as templates for the dashboard's submit page."""
    out = []
    for path in sorted(EXAMPLES.glob("*.json")):
        if path.stem.endswith("-sweep"):  # a sweep (POST /sweeps), not a training spec
            continue
        try:
            text = path.read_text(encoding="utf-8")
            out.append(Example(name=path.stem, text=text, spec=json.loads(text)))
        except (OSError, ValueError):
            continue  # a broken example must not take the submit page down
    return out
