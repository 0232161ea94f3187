"""OAuth 2.0 credentials of a local Bitrix24 application, the alternative to a webhook.

An `OAuthCredential` sends every call with ``auth=<access token>`` to the portal's
``client_endpoint``. It gets access tokens from the OAuth server (``oauth.token``, a GET
to ``{server}oauth/token/?grant_type=refresh_token&...``) only when it has none that is
valid: on first use, shortly before the current one expires, and once after the portal
answers ``expired_token`` or ``invalid_token``. Never on every call: Bitrix24 may block
applications that refresh too eagerly (docs/bitrix24.md §1).

Every refresh rotates the refresh token, and the old one stops working at once. So the new
pair is written to ``state_file`` atomically (temporary file in the same directory, fsync,
rename, fsync of the directory) *before* the new access token is used; a crash at any
point leaves a state file holding a refresh token the server still accepts, or, in the
window after the server rotated and before the rename, the old file intact. If the write
fails the new pair stays in memory, unused, and every later call tries to write it again
first, so fixing the disk recovers without authorising the application again.

Failure policy:

- The server refuses the grant (any error body with a 4xx status, e.g. ``invalid_grant``
  or ``invalid_client``), or the state file is unreadable: the credential stops asking.
  Every call fails at once with the same `BitrixError` (so the poller logs it once and
  reports ``bitrix24_up 0``) until the state file changes on disk (its size, mtime or
  inode) or the config changes (which builds a new credential). No token request is made
  in between, however many poll cycles pass.
- The server cannot be reached, times out or answers 5xx: no new token request for
  `retry_after` seconds; an access token that has not expired yet is still used.

`secrets` lists the client secret and the current tokens, and every token this credential
reads or obtains is registered with `exporter.logs.add_secrets` before anything could log
it. Messages never contain a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from exporter.config import OAuthAuth
from exporter.failures import BitrixError, Code
from exporter.filestamp import FileStamp, file_stamp
from exporter.logs import add_secrets

__all__ = ["TOKEN_METHOD", "OAuthCredential", "TokenState", "read_state", "write_state"]

log = logging.getLogger(__name__)

# The `method` of errors from the OAuth server, in BitrixError and in logs.
TOKEN_METHOD: Final = "oauth.token"

# Without `expires_in` the documented lifetime is the best guess (docs/bitrix24.md §1).
_DEFAULT_LIFETIME: Final = 3600.0


@dataclass(frozen=True)
class TokenState:
    """What the state file holds: the current token pair and the API base to use it on.

    `expires` is unix time on this host's clock; 0 when unknown (the access token is then
    treated as expired). `access_token` is empty before the first refresh.
    """

    refresh_token: str = field(repr=False)
    access_token: str = field(default="", repr=False)
    expires: float = 0.0
    client_endpoint: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "refresh_token": self.refresh_token,
            "access_token": self.access_token,
            "expires": int(self.expires),
        }
        if self.client_endpoint:
            data["client_endpoint"] = self.client_endpoint
        return data

    @classmethod
    def from_json(cls, data: object) -> TokenState:
        """Read the decoded state file; ValueError says what is wrong (never a value)."""
        if not isinstance(data, dict):
            raise ValueError("must hold a JSON object")
        refresh = data.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            raise ValueError("refresh_token must be a non-empty string")
        access = data.get("access_token", "")
        if not isinstance(access, str):
            raise ValueError("access_token must be a string")
        expires = data.get("expires", 0)
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise ValueError("expires must be a unix time")
        endpoint = data.get("client_endpoint")
        if endpoint is not None and _endpoint(endpoint) is None:
            raise ValueError("client_endpoint must be an http:// or https:// URL")
        return cls(refresh, access, float(expires), _endpoint(endpoint))


def read_state(path: str) -> TokenState | None:
    """The state file's content; None if it does not exist. Raises OSError or ValueError."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        raise ValueError("is not valid JSON") from None
    return TokenState.from_json(data)


def write_state(path: str, state: TokenState) -> None:
    """Replace the state file atomically and durably; on failure the old file is untouched.

    The temporary file lives in the same directory so that the rename cannot cross file
    systems; mkstemp creates it readable by the owner only, and the rename keeps that.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(state.to_json(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename is durable only once the directory entry is on disk too.
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class _Halt:
    """Why token requests are paused: until `until` (unix time), or while `stamp` holds."""

    error: BitrixError
    stamp: FileStamp | None = None  # the state file when the halt began (None: no file)
    until: float | None = None  # None: until the state file or the config changes


class OAuthCredential:
    """A local application's tokens for one portal; implements `exporter.bitrix.Credential`.

    `refresh_margin` seconds before expiry the next call refreshes first (at most half of
    the token's lifetime, so short-lived tokens are not refreshed on every call).
    `retry_after` seconds pass between token requests after a transient failure.
    """

    def __init__(
        self,
        portal: str,
        auth: OAuthAuth,
        *,
        timeout: float = 30.0,
        refresh_margin: float = 60.0,
        retry_after: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.portal = portal
        self.auth = auth
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._margin = refresh_margin
        self._retry_after = retry_after
        self._clock = clock
        self._state: TokenState | None = None
        self._refresh_at = 0.0
        self._loaded = False
        # A rotated pair the state file does not hold yet, with its refresh_at.
        self._unsaved: tuple[TokenState, float] | None = None
        self._halt: _Halt | None = None
        # One refresh at a time; the lock orders the callers, the task does the work so a
        # cancelled caller cannot abandon a rotation between the server and the state file.
        self._lock = asyncio.Lock()
        self._refreshing: asyncio.Task[TokenState] | None = None
        # The access token the current asyncio task last sent, so that `refresh` can tell
        # "my token was refused" from "someone already replaced the token I sent".
        self._sent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"oauth_sent_{portal}", default=None
        )
        add_secrets(auth.client_secret, auth.refresh_token or "")

    def __repr__(self) -> str:
        return f"OAuthCredential(portal={self.portal!r}, client_id={self.auth.client_id!r})"

    # -- the Credential protocol ------------------------------------------------------

    @property
    def secrets(self) -> tuple[str, ...]:
        found = [self.auth.client_secret, self.auth.refresh_token or ""]
        for state in (self._state, self._unsaved[0] if self._unsaved else None):
            if state is not None:
                found += [state.access_token, state.refresh_token]
        return tuple(s for s in found if s)

    async def target(
        self, session: aiohttp.ClientSession, method: str
    ) -> tuple[str, dict[str, str]]:
        state = self._state
        if state is None or not self._fresh(state) or self._unsaved or self._halt:
            async with self._lock:
                state = await self._usable(session)
        self._sent.set(state.access_token)
        return (state.client_endpoint or self.auth.client_endpoint) + method, {
            "auth": state.access_token
        }

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        sent = self._sent.get()
        async with self._lock:
            self._prepare()
            state = self._state
            if state is not None and sent is not None and state.access_token != sent:
                return True  # another caller refreshed while this one waited
            halt = self._halt
            if halt is not None and halt.until is not None and self._clock() < halt.until:
                raise _copy(halt.error)
            await self._rotate(session)
            return True

    # -- under the lock ---------------------------------------------------------------

    async def _usable(self, session: aiohttp.ClientSession) -> TokenState:
        self._prepare()
        state = self._state
        assert state is not None
        if self._fresh(state):
            return state
        halt = self._halt
        if halt is not None and halt.until is not None and self._clock() < halt.until:
            if state.access_token and self._clock() < state.expires:
                return state  # the refresh failed, but this token still works for a while
            raise _copy(halt.error)
        return await self._rotate(session)

    def _prepare(self) -> None:
        """Load the state file once, honour a halt, and save a pending rotated pair."""
        halt = self._halt
        if halt is not None and halt.until is None:
            if file_stamp(self.auth.state_file) == halt.stamp:
                raise _copy(halt.error)
            log.info(
                "portal %s: OAuth state file %s changed, trying it",
                self.portal,
                self.auth.state_file,
            )
            self._halt = None
            self._loaded = False
        if not self._loaded:
            self._load()
        if self._unsaved is not None:
            self._save(*self._unsaved)

    def _load(self) -> None:
        path = self.auth.state_file
        try:
            state = read_state(path)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self._stop(Code.STATE_FILE, f"cannot read state file {path}: {reason}") from None
        if state is None:
            if not self.auth.refresh_token:
                raise self._stop(
                    Code.NO_REFRESH_TOKEN,
                    f"state file {path} does not exist and oauth.refresh_token is not set;"
                    " authorise the application and set oauth.refresh_token",
                )
            state = TokenState(self.auth.refresh_token)
        add_secrets(state.access_token, state.refresh_token)
        self._state = state
        # Written by an earlier run: the lifetime is unknown, so the plain margin applies.
        self._refresh_at = state.expires - self._margin
        self._loaded = True

    async def _rotate(self, session: aiohttp.ClientSession) -> TokenState:
        task = self._refreshing
        if task is None or task.done():
            assert self._state is not None
            task = asyncio.create_task(self._request_tokens(session, self._state))
            task.add_done_callback(self._rotated)
            self._refreshing = task
        return await asyncio.shield(task)

    def _rotated(self, task: asyncio.Task[TokenState]) -> None:
        if self._refreshing is task:
            self._refreshing = None
        if not task.cancelled():
            # Retrieved here so a rotation whose caller was cancelled does not warn at exit.
            task.exception()

    # -- the OAuth server -------------------------------------------------------------

    async def _request_tokens(
        self, session: aiohttp.ClientSession, current: TokenState
    ) -> TokenState:
        """One token request; adopts and saves the new pair, or raises BitrixError."""
        params = {
            "grant_type": "refresh_token",
            "client_id": self.auth.client_id,
            "client_secret": self.auth.client_secret,
            "refresh_token": current.refresh_token,
        }
        url = self.auth.server + "oauth/token/"
        started = self._clock()
        status: int | None = None
        try:
            async with session.get(
                url, params=params, headers={"Accept": "application/json"}, timeout=self._timeout
            ) as response:
                status = response.status
                raw = await response.read()
        except TimeoutError:
            raise self._pause(
                Code.TIMEOUT, "no answer from the OAuth server in time", None
            ) from None
        except aiohttp.ClientError as exc:
            raise self._pause(Code.CONNECTION, f"{type(exc).__name__}: {exc}", None) from None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise self._pause(
                Code.INVALID_RESPONSE, "the OAuth server's answer is not JSON", status
            )
        if "error" in body:
            raise self._refused(str(body["error"]), str(body.get("error_description", "")), status)
        access, refresh = body.get("access_token"), body.get("refresh_token")
        if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
            raise self._pause(Code.INVALID_RESPONSE, "the answer has no token pair", status)
        add_secrets(access, refresh)
        lifetime = _lifetime(body)
        # expires_in on our own clock rather than the server's `expires`: a skewed clock
        # must not make every token look expired (and so refresh on every call).
        expires = started + lifetime
        endpoint = _endpoint(body.get("client_endpoint")) or current.client_endpoint
        state = TokenState(refresh, access, expires, endpoint)
        refresh_at = expires - min(self._margin, lifetime / 2)
        first = not current.access_token
        self._unsaved = (state, refresh_at)
        self._save(state, refresh_at)
        self._halt = None
        log.log(
            logging.INFO if first else logging.DEBUG,
            "portal %s: OAuth access token obtained (valid %.0fs), state file %s updated",
            self.portal,
            lifetime,
            self.auth.state_file,
        )
        return state

    def _save(self, state: TokenState, refresh_at: float) -> None:
        """Write the pair to the state file, then (only then) make it the one in use."""
        path = self.auth.state_file
        try:
            write_state(path, state)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise BitrixError(
                self.portal,
                TOKEN_METHOD,
                Code.STATE_FILE,
                f"cannot write state file {path}: {reason}; the new refresh token is held"
                " in memory only and is written as soon as the file can be written",
            ) from None
        self._state = state
        self._refresh_at = refresh_at
        self._unsaved = None

    # -- failures ---------------------------------------------------------------------

    def _refused(self, code: str, description: str, status: int | None) -> BitrixError:
        if status is not None and status >= 500:
            return self._pause(code, description, status)
        path = self.auth.state_file
        hints = {
            "invalid_grant": "the refresh token is no longer valid; authorise the application"
            f" again and write the new refresh token to the state file {path} (or delete it"
            " and set oauth.refresh_token)",
            "invalid_client": "client_id or client_secret was refused; check the oauth section"
            " of the config",
        }
        hint = hints.get(code, f"the OAuth server refused the refresh token in {path}")
        text = f"{description}: {hint}" if description else hint
        return self._stop(code, text + "; no new token request until then", status)

    def _stop(self, code: str, description: str, status: int | None = None) -> BitrixError:
        """Stop asking the OAuth server until the state file or the config changes."""
        error = BitrixError(self.portal, TOKEN_METHOD, code, self._redact(description), status)
        self._halt = _Halt(error, stamp=file_stamp(self.auth.state_file))
        return _copy(error)

    def _pause(self, code: str, description: str, status: int | None) -> BitrixError:
        """A transient failure: no new token request for `retry_after` seconds."""
        text = self._redact(f"{description}; next token request in {self._retry_after:.0f}s")
        error = BitrixError(self.portal, TOKEN_METHOD, code, text, status)
        self._halt = _Halt(error, until=self._clock() + self._retry_after)
        return _copy(error)

    def _fresh(self, state: TokenState) -> bool:
        return bool(state.access_token) and self._clock() < self._refresh_at

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<secret>")
        return text


def _copy(error: BitrixError) -> BitrixError:
    # A new exception per raise: re-raising one instance would grow its traceback forever.
    return BitrixError(error.portal, error.method, error.error, error.description, error.status)


def _lifetime(body: Mapping[str, Any]) -> float:
    value = body.get("expires_in")
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return _DEFAULT_LIFETIME


def _endpoint(value: object) -> str | None:
    """A usable REST base URL ending in a slash, or None."""
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        return None
    return value if value.endswith("/") else value + "/"
