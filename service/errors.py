"""Errors as the clients see them: OpenAI's envelope {"error": {message, type, param, code}}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "overloaded",
    500: "server_error",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None):
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def note_error(scope, message: str) -> None:
    """Keep an error's message in request.state.error, for the request's log record."""
    scope.setdefault("state", {})["error"] = message


def field_name(loc: tuple) -> str | None:
    """('body', 'n') -> 'n'; the body as a whole -> None."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        note_error(request.scope, e.message)
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        loc, kind = tuple(first.get("loc", ())), first.get("type")
        if kind == "json_invalid":  # its loc is a character position, not a field
            status, param = 400, None
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'invalid')}"
        elif loc == ("body",) and kind == "missing":
            status, param, message = 400, None, "the body is empty: send a JSON object"
        elif loc == ("body",) and kind in ("model_attributes_type", "dict_type"):
            # FastAPI reads a body as JSON only when it is sent as JSON: `curl -d` sends a form
            status, param = 400, None
            sent_as = request.headers.get("content-type", "no content type")
            message = "the body must be a JSON object"
            if "json" not in sent_as.lower():
                message += f" sent with content-type: application/json (it came as {sent_as})"
        else:
            status, param = 422, field_name(loc)
            message = first.get("msg", "invalid request")
            message = f"{param}: {message}" if param else message
        note_error(request.scope, message)
        return error_response(status, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        note_error(request.scope, str(e.detail))
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        note_error(request.scope, f"internal error: {type(e).__name__}")
        return error_response(500, f"internal error: {type(e).__name__}")
