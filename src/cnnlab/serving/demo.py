"""`cnnlab demo`: a page to try a served model; serves the page and forwards /invocations to the model server."""
from __future__ import annotations

import http.client
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from importlib.resources import files

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cnnlab.serving.guard import VERSION_HEADER, TooLarge, error_body, read_body

PAGE = {"/": ("index.html", "text/html; charset=utf-8"), "/demo.css": ("demo.css", "text/css; charset=utf-8"),
        "/demo.js": ("demo.js", "text/javascript; charset=utf-8")}
# everything from this origin: works offline, and a file name or label can never load or run anything else
# img-src data: for the Grad-CAM PNGs in the model's answer
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                      "media-src 'self' blob: mediastream:; object-src 'none'; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
ENVELOPE = 1024  # bytes of JSON around the base64 image in the page's request
TIMEOUT = 120  # seconds for the model server's answer
CONCURRENCY = 16  # requests in flight; with the body limit this bounds the memory bodies take


def serve_hint(model_url: str) -> str:
    url = urllib.parse.urlsplit(model_url)
    return (f"start it with `mlflow models serve -m models:/fer_cnn@champion --env-manager local -h {url.hostname} "
            f"-p {url.port or 5000}` or point `cnnlab demo --model-url` at it")


def max_file_bytes(max_body: int) -> int:
    """The largest image file whose base64 request fits in max_body bytes."""
    return (max_body - ENVELOPE) * 3 // 4


def error(status: int, code: str, message: str) -> Response:
    return Response(error_body(code, message), status_code=status, media_type="application/json")


def forward(model_url: str, body: bytes, content_type: str) -> tuple[int, bytes, str]:
    """POST the body to the model server's /invocations: (HTTP status, answer, the served version `cnnlab serve` names
    in a header, else ""); ConnectionError when unreachable."""
    request = urllib.request.Request(model_url + "/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read(), response.headers.get(VERSION_HEADER.decode(), "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get(VERSION_HEADER.decode(), "")
    except TimeoutError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(f"the model server at {model_url} is not reachable ({reason}); "
                              f"{serve_hint(model_url)}") from None


def model_answer(model_url: str, status: int, answer: bytes, version: str = "") -> Response:
    """The model server's answer as it is when it is JSON; otherwise a JSON error that quotes it."""
    try:
        json.loads(answer)
    except ValueError:
        text = answer.decode("utf-8", "replace").strip()[:300]
        return error(502, "BAD_MODEL_SERVER_ANSWER", f"the server at {model_url} answered HTTP {status} with no JSON "
                                                     f"({text!r}); is it a model server? {serve_hint(model_url)}")
    return Response(answer, status_code=status, media_type="application/json",
                    headers={VERSION_HEADER.decode(): version} if version else None)


async def body_within(request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is over limit bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    try:
        return await read_body(request.receive, limit) or b""
    except TooLarge:
        return None


def ping(model_url: str) -> tuple[bool, str]:
    """Whether the model server answers /ping, and a sentence saying so (or how to start it)."""
    try:
        with urllib.request.urlopen(model_url + "/ping", timeout=5) as response:
            return response.status == 200, f"model server {model_url}: ready"
    except urllib.error.HTTPError as e:
        return False, f"model server {model_url}: /ping answered HTTP {e.code}; is it one? {serve_hint(model_url)}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"model server {model_url} is not reachable ({getattr(e, 'reason', e)}); {serve_hint(model_url)}"


def create_app(model_url: str, max_body: int) -> Starlette:
    """The page's three files, /status (model server up? the upload limit) and /invocations (forwarded)."""
    model_url = model_url.rstrip("/")
    folder = files(__package__) / "demo_page"
    page = {path: (folder.joinpath(name).read_bytes(), media) for path, (name, media) in PAGE.items()}

    async def asset(request):
        body, media = page[request.url.path]
        return Response(body, media_type=media, headers=HEADERS)

    async def status(request):
        ready, message = await run_in_threadpool(ping, model_url)
        return JSONResponse({"model_url": model_url, "ready": ready, "message": message,
                             "max_file_bytes": max_file_bytes(max_body)}, headers={"Cache-Control": "no-store"})

    async def invocations(request):
        body = await body_within(request, max_body)
        if body is None:
            return error(413, "REQUEST_TOO_LARGE", f"request body over {max_body} bytes; this demo forwards up to "
                                                   f"{max_body / 2**20:g} MB (`cnnlab demo --max-body-mb`)")
        try:
            status_code, answer, version = await run_in_threadpool(
                forward, model_url, body, request.headers.get("content-type", "application/json"))
        except ConnectionError as e:
            return error(502, "MODEL_SERVER_UNAVAILABLE", str(e))
        except TimeoutError:
            return error(504, "MODEL_SERVER_TIMEOUT", f"the model server at {model_url} did not answer in {TIMEOUT} s")
        return model_answer(model_url, status_code, answer, version)

    routes = [Route(path, asset) for path in page]
    routes += [Route("/status", status), Route("/invocations", invocations, methods=["POST"])]
    return Starlette(routes=routes)


def serve(model_url: str, host: str = "127.0.0.1", port: int = 8080, max_body_mb: float = 16) -> None:
    """Serve the demo page on host:port until interrupted."""
    if not model_url.startswith(("http://", "https://")):
        raise ValueError(f"--model-url must be an http:// or https:// URL, got {model_url!r}")
    if not 0 < max_body_mb <= 1024:
        raise ValueError(f"--max-body-mb must be within (0, 1024], got {max_body_mb}")
    logging.getLogger(__name__).info("open http://%s:%d/ (%s)", host, port, ping(model_url.rstrip("/"))[1])
    app = create_app(model_url, int(max_body_mb * 2**20))
    uvicorn.run(app, host=host, port=port, limit_concurrency=CONCURRENCY, log_level="info")
