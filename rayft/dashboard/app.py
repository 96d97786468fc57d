"""The dashboard's HTTP app: the page, the JSON it polls, its actions, and the guards in front.

    GET  /                          the page (static/index.html, its CSS and JavaScript)
    GET  /api/config                what the page may offer (the playground, and where it sends)
    GET  /api/state                 jobs, replicas (memory estimate vs budget), recent events
    GET  /api/jobs/{id}/metrics     a job's rows (step, loss, tokens/s, padding, eval loss), ?after=STEP
    POST /api/jobs/{id}/cancel      as `rayft cancel`
    POST /api/jobs/{id}/priority    {"priority": N}, as `rayft priority`
    GET  /api/serve/models          the Serve app's adapters, and
    POST /api/serve/completions     {"model", "prompt", "max_tokens"}: the playground, passed on to it

Guards: a request whose Host is not one the dashboard answers to is refused (a page elsewhere that
renames itself to 127.0.0.1, DNS rebinding, reads nothing); an action (any POST) must come from the
page's own origin (its Origin header; no CORS is answered), so another site cannot cancel a job
through a visitor's browser; every response forbids framing and inline script. The page writes
every value as text, never as HTML (job names and errors are user input).
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.error
import urllib.request
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from rayft.dashboard.source import ControllerSource, SourceError

STATIC = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PriorityRequest(_Body):
    priority: StrictInt


class PlaygroundRequest(_Body):
    model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1, max_length=8000)
    max_tokens: StrictInt = Field(default=32, ge=1, le=512)


def allowed_hosts(host: str, port: int, extra: list[str] = ()) -> set[str]:
    """The Host headers a dashboard bound to host:port answers to: its own name and, as local names
    of the same machine, 127.0.0.1, localhost and [::1]; plus `extra` (names, or name:port)."""
    names = set(LOCAL_HOSTS) | ({host} if host not in ("0.0.0.0", "::") else set()) | set(extra)
    with_port = {n for n in names if ":" in n.rsplit("]", 1)[-1]}
    bare = names - with_port
    return with_port | {f"{n}:{port}" for n in bare} | (bare if port == 80 else set())


def _finite(value):
    """A value for JSON: NaN and infinity (a skipped step's loss) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_app(source=None, serve_url: str | None = None, hosts: set[str] | None = None,
              same_origin_serve: bool = False) -> FastAPI:
    """The dashboard app. `source`: its data and actions (default: the controller of the connected
    Ray cluster); `serve_url`: the Serve app the playground passes completions to (None: no
    playground, or with `same_origin_serve` the page calls the app it is mounted in); `hosts`: the
    Host headers it answers to (None: any, when another server in front decides, as Serve does)."""
    source = source or ControllerSource()
    app = FastAPI(title="rayft dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    async def run(fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except SourceError as e:
            raise _Refused(e.status, str(e)) from None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if hosts is not None and host not in hosts:
            return _error(403, f"Host {host!r} is not one this dashboard answers to (`rayft dashboard --allow-host`)")
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin != f"{request.url.scheme}://{host}":
                why = "no Origin header" if origin is None else f"Origin {origin!r}"
                return _error(403, f"cross-origin action refused ({why}): actions come from the dashboard's own page")
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(_Refused)
    async def refused(_: Request, e: _Refused):
        return _error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first["loc"][1:]) or "request body"
        return _error(400, f"{where}: {first['msg']}")

    @app.get("/")
    async def page():
        return _static("index.html")

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            return _error(404, f"no file {name!r}")
        return _static(name)

    @app.get("/api/config")
    async def config():
        serve = "same-origin" if same_origin_serve else ("proxy" if serve_url else None)
        return {"serve": serve, "serve_url": serve_url}

    @app.get("/api/state")
    async def state():
        return _finite(await run(source.status))

    @app.get("/api/jobs/{job_id}/metrics")
    async def metrics(job_id: str, after: Annotated[int, Query(ge=-1)] = -1):
        return {"job": job_id, "rows": _finite(await run(source.metrics, job_id, after))}

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        return {"job": job_id, "state": await run(source.cancel, job_id)}

    @app.post("/api/jobs/{job_id}/priority")
    async def priority(job_id: str, body: PriorityRequest):
        return {"job": job_id, "priority": await run(source.set_priority, job_id, body.priority)}

    @app.get("/api/serve/models")
    async def models():
        return await _serve("GET", "/v1/models", None)

    @app.post("/api/serve/completions")
    async def complete(body: PlaygroundRequest):
        return await _serve("POST", "/v1/completions", {**body.model_dump(), "temperature": 0})

    async def _serve(method: str, path: str, body: dict | None):
        if not serve_url:
            raise _Refused(404, "no Serve app is configured for the playground (`rayft dashboard --serve-url`)")
        return await asyncio.get_running_loop().run_in_executor(None, _forward, serve_url, method, path, body)

    return app


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def _static(name: str) -> Response:
    body = resources.files("rayft.dashboard").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name])


def _forward(base: str, method: str, path: str, body: dict | None) -> JSONResponse:
    """One call to the Serve app; its answer (an OpenAI-shaped error too) passed back as it came."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base.rstrip("/") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return JSONResponse(json.loads(r.read()), status_code=r.status)
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read())
            message = answer.get("error", {}).get("message") if isinstance(answer.get("error"), dict) else None
        except ValueError:
            message = None
        return _error(e.code, message or f"the Serve app answered {e.code}")
    except (urllib.error.URLError, OSError) as e:
        return _error(502, f"the Serve app at {base} cannot be reached ({getattr(e, 'reason', e)})")
