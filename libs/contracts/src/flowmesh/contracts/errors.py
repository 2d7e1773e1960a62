"""The error vocabulary shared by every service, mapped to problem+json at the gateway in one place.

A service raises one of these; request/reply handlers turn it into ``{"error": <problem>}``, and the
calling side turns that back into the same exception with :func:`from_problem`.
"""

from __future__ import annotations

from typing import ClassVar

from flowmesh.contracts.models.problem import FieldError, Problem


class FlowmeshError(Exception):
    """Base of every error a client may see."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None, *, errors: list[FieldError] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.errors = errors

    def to_problem(self, instance: str | None = None) -> Problem:
        """This error as an RFC 9457 problem."""
        return Problem(
            type=self.code,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=self.errors,
        )


class BadRequest(FlowmeshError):
    """The request cannot be read (malformed JSON, wrong content type)."""

    status = 400
    code = "bad-request"
    title = "Bad request"


class Unauthorized(FlowmeshError):
    """No valid credentials."""

    status = 401
    code = "unauthorized"
    title = "Unauthorized"


class Forbidden(FlowmeshError):
    """Valid credentials, but not allowed."""

    status = 403
    code = "forbidden"
    title = "Forbidden"


class QuotaExceeded(Forbidden):
    """A plan limit refuses the operation."""

    code = "quota-exceeded"
    title = "Quota exceeded"


class NotFound(FlowmeshError):
    """No such resource for this tenant (also: another tenant's resource)."""

    status = 404
    code = "not-found"
    title = "Not found"


class MethodNotAllowed(FlowmeshError):
    """The route exists but not with this method."""

    status = 405
    code = "method-not-allowed"
    title = "Method not allowed"


class Conflict(FlowmeshError):
    """The resource's state does not allow the operation."""

    status = 409
    code = "conflict"
    title = "Conflict"


class PreconditionFailed(FlowmeshError):
    """``If-Match`` does not match the current ETag."""

    status = 412
    code = "precondition-failed"
    title = "Precondition failed"


class PayloadTooLarge(FlowmeshError):
    """The body is over the size limit."""

    status = 413
    code = "payload-too-large"
    title = "Payload too large"


class UnsupportedMediaType(FlowmeshError):
    """The body is not of a content type the route accepts."""

    status = 415
    code = "unsupported-media-type"
    title = "Unsupported media type"


class InvalidInput(FlowmeshError):
    """The body is well-formed but its content is not valid; ``errors`` says where."""

    status = 422
    code = "validation-error"
    title = "Validation error"


class RateLimited(FlowmeshError):
    """Too many requests, or too many runs in flight; ``retry_after_s`` says when to try again."""

    status = 429
    code = "rate-limited"
    title = "Too many requests"

    def __init__(
        self, detail: str | None = None, *, errors: list[FieldError] | None = None, retry_after_s: int = 1
    ) -> None:
        super().__init__(detail, errors=errors)
        self.retry_after_s = max(1, retry_after_s)


class ServiceUnavailable(FlowmeshError):
    """A service the request needs is not reachable; retry later."""

    status = 503
    code = "service-unavailable"
    title = "Service unavailable"


class ReplyTooLarge(FlowmeshError):
    """A service's answer was too large to send over NATS (over the connection's ``max_payload``)."""

    status = 502
    code = "reply-too-large"
    title = "Reply too large"


class GatewayTimeout(FlowmeshError):
    """A service did not answer in time."""

    status = 504
    code = "timeout"
    title = "Timeout"


_BY_CODE: dict[str, type[FlowmeshError]] = {
    cls.code: cls
    for cls in (
        FlowmeshError,
        BadRequest,
        Unauthorized,
        Forbidden,
        QuotaExceeded,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PreconditionFailed,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidInput,
        RateLimited,
        ServiceUnavailable,
        ReplyTooLarge,
        GatewayTimeout,
    )
}


def from_problem(problem: Problem) -> FlowmeshError:
    """The exception a problem stands for (a plain :class:`FlowmeshError` for unknown codes)."""
    cls = _BY_CODE.get(problem.type, FlowmeshError)
    return cls(problem.detail, errors=problem.errors)
