"""What the OpenAPI document says beyond the routes' own types: the errors each answers, and the links
from a created job or entry to the operations that take its id (clients and fuzzers follow them)."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

DESCRIPTIONS = {400: "the body cannot be read as JSON, or the URL holds a NUL byte", 401: "missing, invalid or revoked API key",
                404: "no such job or entry for this tenant",
                408: "the request body did not arrive within MIXQ_BODY_TIMEOUT_SECONDS",
                409: "not possible in the current state", 410: "the artifact is no longer stored",
                413: "request body too large", 429: "the tenant's limit of queued and running jobs; see Retry-After"}


class ErrorOut(BaseModel):
    detail: str


def errors(*codes: int) -> dict:
    return {code: {"description": DESCRIPTIONS[code], "model": ErrorOut} for code in codes}


def links(parameter: str, expression: str, *operations: str) -> dict:
    """OpenAPI links passing `expression` (e.g. `$response.body#/id`) as `parameter` to each operation."""
    return {operation: {"operationId": operation, "parameters": {parameter: expression}} for operation in operations}


def invalid(location: tuple[str, ...], message: str) -> RequestValidationError:
    """A 422 in the same shape as the schema's own validation errors, for checks that need the server."""
    return RequestValidationError([{"type": "value_error", "loc": location, "msg": message}])
