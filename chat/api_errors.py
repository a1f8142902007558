"""One error body across the REST API: `{"error": {"code", "message", ...}}`, the socket's
error frame (docs/websocket.md) without its `type`, with the same codes and extra fields
(`retry_after`, `status`, `job_id`) and, for a request that does not validate, `fields`.

DRF's own errors (authentication, 404, 405, validation...) are put in that shape by
`api_exception_handler`, the REST_FRAMEWORK exception handler; the views raise `ApiError`
for theirs. The stream view (chat/stream.py), not a DRF view, answers with `api_error_body`.
"""

import logging
from collections.abc import Mapping
from typing import Any

from django.db import InterfaceError, OperationalError
from redis.exceptions import RedisError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler

logger = logging.getLogger(__name__)

# How long a client waits before retrying when Redis or PostgreSQL failed under a request.
UNAVAILABLE_RETRY_AFTER_SECONDS = 5
UNAVAILABLE_MESSAGE = "Server busy, please retry your request."

# Failures of a dependency, not of the request: 503, never a 500 with a traceback.
DEPENDENCY_ERRORS = (OperationalError, InterfaceError, RedisError)


def api_error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


class ApiError(exceptions.APIException):
    """An error of a view, with the socket's code and extras; `retry_after` (seconds) is
    also sent as the Retry-After header."""

    def __init__(
        self,
        *,
        http_status: int,
        code: str,
        message: str,
        retry_after: int | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail=message, code=code)
        self.status_code = http_status
        self.code, self.message = code, message
        self.wait = retry_after  # DRF's handler makes it the Retry-After header
        self.extra = extra if retry_after is None else {**extra, "retry_after": retry_after}


def unavailable() -> ApiError:
    return ApiError(
        http_status=status.HTTP_503_SERVICE_UNAVAILABLE,
        code="unavailable",
        message=UNAVAILABLE_MESSAGE,
        retry_after=UNAVAILABLE_RETRY_AFTER_SECONDS,
    )


def api_exception_handler(exc: Exception, context: Mapping[str, Any]) -> Response | None:
    if isinstance(exc, DEPENDENCY_ERRORS):
        logger.exception("API request failed: a dependency is down")
        exc = unavailable()
    response = exception_handler(exc, dict(context))
    if response is None:
        return None  # not an API error: Django's 500
    response.data = {"error": _error_of(exc, response.data)}
    return response


def _error_of(exc: Exception, data: Any) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return {"code": exc.code, "message": exc.message, **exc.extra}
    if isinstance(exc, exceptions.ValidationError):
        return _validation_error(data)
    if isinstance(exc, exceptions.ParseError):
        return {"code": "invalid", "message": str(data["detail"])}  # as the socket says it
    # DRF's {"detail": ErrorDetail} (Http404 and PermissionDenied become these too), or
    # simplejwt's {"detail", "code", "messages"} for a token it refuses.
    detail = data.get("detail", "") if isinstance(data, dict) else data
    code = data.get("code") if isinstance(data, dict) else None
    return {"code": str(code or getattr(detail, "code", None) or "error"), "message": str(detail)}


def _validation_error(data: Any) -> dict[str, Any]:
    fields = data if isinstance(data, dict) else {"non_field_errors": data}
    problems = [(name, error) for name, errors in fields.items() for error in _listed(errors)]
    # Only too long: the socket's too_long; anything else about the request: invalid.
    too_long = all(getattr(error, "code", None) == "max_length" for _, error in problems)
    first_name, first = problems[0] if problems else ("", "The request is not valid.")
    message = str(first) if first_name == "non_field_errors" else f"{first_name}: {first}"
    return {
        "code": "too_long" if too_long and problems else "invalid",
        "message": message,
        "fields": fields,
    }


def _listed(errors: Any) -> list[Any]:
    if isinstance(errors, dict):
        return [error for nested in errors.values() for error in _listed(nested)]
    return list(errors) if isinstance(errors, list) else [errors]
