"""What `idx serve` promises every client, apart from the search itself: one error shape,
known query parameters only, an OpenAPI schema that describes the uploads, and an index at `/`.

Every error answer is `{"error": code, "message": one line, "reason": short key}` (plus a few
fields such as `param` or `max_bytes`): ours (ApiError), FastAPI's validation errors (which
would otherwise be `{"detail": [...]}`), unknown routes and methods, and anything unexpected
(500). The interactive `/docs` and `/redoc` pages are off: FastAPI builds them from Swagger UI
and ReDoc files on a CDN, which a machine without internet access (or a careful one) cannot
load, and no installed package ships those files. `/openapi.json` is served; any OpenAPI
viewer can load it, and it describes the image bodies, so such a viewer can send them.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

DOCS_NOTE = ("The interactive /docs page is off: it would load Swagger UI from a CDN. Load "
             "/openapi.json into any OpenAPI viewer instead; it describes every endpoint and "
             "its image body.")


class ApiError(Exception):
    """An error that becomes one JSON response: {"error": code, "message", "reason"}. The
    reason is a short key (a bad image's BadImage.reason, ...); by default the code."""

    def __init__(self, status: int, code: str, message: str, reason: str | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.reason = reason or code

    def body(self) -> dict:
        return {"error": self.code, "message": self.message, "reason": self.reason,
                **{k: v for k, v in self.extra.items() if k != "retry_after"}}

    def response(self) -> JSONResponse:
        headers = ({"Retry-After": str(self.extra["retry_after"])}
                   if "retry_after" in self.extra else None)
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def check_params(request: Request, allowed: tuple[str, ...]) -> None:
    """An unknown query parameter is an error (a typo such as ?lable=3 would otherwise search
    without the filter and look like an answer)."""
    unknown = sorted(set(request.query_params) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise ApiError(422, "invalid_request", f"unknown query parameter(s) "
                       f"{', '.join(unknown)} (known: {known})", reason="unknown_parameter",
                       param=unknown[0])


# The image body, for the OpenAPI schema: the handlers read the request themselves (a raw body
# of any image type, or the first file of a multipart form), so FastAPI cannot infer it.
UPLOAD_BODY: dict[str, Any] = {"requestBody": {
    "required": True,
    "description": "The image: the raw bytes (any image type), or a multipart form whose first "
                   "file is the image (curl -F file=@photo.jpg).",
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}}}},
    },
}}
# /search?id= searches from a stored point and takes no body.
SEARCH_BODY: dict[str, Any] = {"requestBody": dict(UPLOAD_BODY["requestBody"], required=False,
                                                   description="The image, unless ?id= names a "
                                                   "stored point. " + UPLOAD_BODY["requestBody"]
                                                   ["description"])}

ROUTE_ERRORS = {404: ("not_found", "no_route"), 405: ("method_not_allowed", "method")}


def _validation_message(err: dict) -> tuple[str, str, str]:
    """(param, message, reason) of FastAPI's first validation error."""
    loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path", "header")]
    param = ".".join(loc) or "request"
    return param, f"{param}: {err.get('msg', 'invalid')}", str(err.get("type", "invalid"))


def install(app: FastAPI) -> None:
    """The error handlers (one shape for every error) and the index at `/`."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = list(e.errors())
        param, message, reason = _validation_message(errors[0] if errors else {})
        if len(errors) > 1:
            message += "; " + "; ".join(_validation_message(x)[1] for x in errors[1:])
        return ApiError(422, "invalid_request", message, reason=reason, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code, reason = ROUTE_ERRORS.get(e.status_code, ("http_error", str(e.status_code)))
        return JSONResponse(
            {"error": code, "message": f"{e.detail}: {request.method} {request.url.path} "
             "(see / for the endpoints)", "reason": reason},
            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return JSONResponse({"error": "internal_error", "message": f"{type(e).__name__}: {first}",
                             "reason": type(e).__name__}, status_code=500)

    @app.get("/docs", include_in_schema=False)
    async def docs_off() -> JSONResponse:
        return JSONResponse({"error": "not_found", "message": DOCS_NOTE, "reason": "docs_off"},
                            status_code=404)

    @app.get("/", summary="What this service offers")
    async def index() -> dict:
        return {
            "service": "phisearch",
            "endpoints": {
                "GET /healthz": "the collection, its model and φ settings; 503 when unusable",
                "POST /phi": "an image -> its φ with the collection's model and settings",
                "POST /search": "an image (or ?id=) -> nearest hits; ?k=&label=&cluster=&dataset=",
            },
            "openapi": "/openapi.json",
            "docs": DOCS_NOTE,
            "errors": '{"error", "message", "reason"}',
        }
