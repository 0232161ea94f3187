"""Why a fetch failed: one exception family, one set of invented codes.

Every failure the poller can meet while fetching (an HTTP or Bitrix24 error, an answer
it cannot read, a `result: []` that means "not yours to see") is a `FetchError` with an
`error` code and a `description`, the two fields Bitrix24 itself names `error` and
`error_description`. Bitrix24's own codes arrive as strings and pass through as sent;
the codes the exporter invents for what happens below or beside Bitrix24's error layer
are the members of `Code`, written nowhere else.

No I/O and no imports from the rest of the package: the pure mapping functions raise
these too.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Error codes the exporter invents; Bitrix24's own codes are plain strings."""

    TIMEOUT = "timeout"  # no answer within request_timeout
    CONNECTION = "connection"  # refused, reset, name resolution, TLS
    INVALID_RESPONSE = "invalid_response"  # an answer that is not Bitrix24's JSON envelope
    NO_RESPONSE = "no response"  # a cycle in which no request got any answer
    STATE_FILE = "state_file"  # the OAuth state file cannot be read or written
    NO_REFRESH_TOKEN = "no_refresh_token"  # OAuth without a first token nor a state file
    PAYLOAD = "PayloadError"  # a result whose shape the exporter cannot read
    NO_ACCESS = "NoAccess"  # `result: []`: not permitted, unknown user or role
    INTERNAL = "internal"  # a bug in the exporter; logged with its traceback
    NOT_SENT = "not_sent"  # a send answered without an id (im.notify.*: `false`)


class FetchError(Exception):
    """A fetch that failed: its code (`error`) and what happened (`description`)."""

    error: str
    description: str

    def __init__(self, error: str, description: str = "") -> None:
        self.error = str(error)
        self.description = description
        super().__init__(str(self))

    def __str__(self) -> str:
        return self.description


class PayloadError(FetchError, ValueError):
    """A response whose shape the exporter cannot read; the text says what was wrong."""

    def __init__(self, description: str) -> None:
        super().__init__(Code.PAYLOAD, description)


class NoAccess(FetchError, LookupError):
    """`result: []`: no permission for that user, an unknown user, or an unknown role."""

    def __init__(self, description: str) -> None:
        super().__init__(Code.NO_ACCESS, description)


class BitrixError(FetchError):
    """A failed call: portal, method, HTTP status (None without a response) and error code."""

    def __init__(
        self, portal: str, method: str, error: str, description: str = "", status: int | None = None
    ) -> None:
        self.portal = portal
        self.method = method
        self.status = status
        super().__init__(error, description)

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        text = f": {self.description}" if self.description else ""
        return f"portal {self.portal}: {self.method}: {self.error}{text} ({where})"

    @property
    def whole_batch(self) -> bool:
        """The batch request itself failed, so every command in it carries this error."""
        return self.method == "batch"

    @property
    def reached(self) -> bool:
        """The portal answered (with a refusal of the request, not of the credential)."""
        return self.status is not None and self.status < 500 and not self.is_auth

    @property
    def is_auth(self) -> bool:
        """The credential itself was refused; the portal counts as down."""
        return self.error in AUTH_ERRORS

    @property
    def retryable(self) -> bool:
        return self.error in RETRYABLE_ERRORS or (
            self.status is not None and self.status >= 500 and self.error not in AUTH_ERRORS
        )


# Errors that a retry cannot fix: credentials, scopes, plan, arguments, missing methods.
AUTH_ERRORS = frozenset(
    {
        "NO_AUTH_FOUND",
        "INVALID_CREDENTIALS",
        "insufficient_scope",
        "expired_token",
        "invalid_token",
        "ACCESS_DENIED",
        "user_access_error",
        "authorization_error",
        "APPLICATION_NOT_FOUND",
        "METHOD_CONFIRM_WAITING",
        "METHOD_CONFIRM_DENIED",
        "WRONG_AUTH_TYPE",
        "WRONG_LICENSE",
        "PORTAL_DELETED",
        "INVALID_REQUEST",
        "OVERLOAD_LIMIT",
        "invalid_grant",
        "invalid_client",
    }
)
# Transient server-side errors, worth a few more tries.
RETRYABLE_ERRORS = frozenset(
    {
        "INTERNAL_SERVER_ERROR",
        "ERROR_UNEXPECTED_ANSWER",
        "CONNECTION_ERROR",
        "QUERY_LIMIT_EXCEEDED",
        Code.TIMEOUT,
        Code.CONNECTION,
        Code.INVALID_RESPONSE,
    }
)
