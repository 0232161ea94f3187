"""Talking to Bitrix24: URLs, credentials, JSON POST, `batch`, the rate limit, retries.

One `BitrixClient` per credential; the clients of one portal share a `PortalThrottle`
(Bitrix24 counts requests per portal and source address, whichever credential sends them)
and a `ClientStats`. Every failure becomes a `BitrixError` that names the portal, the
method, the HTTP status and the Bitrix error code, and never the webhook secret.

Two limits are enforced on the client side so the portal never has to:
- the leaky bucket (`rate_limit`): `exporter.throttle.PortalThrottle`;
- the per-method operating budget (`operating_limit` seconds of execution time per
  10 minutes): `exporter.budget.OperatingBudget`, which learns from the `time` block of
  every answer and decides how many calls of a method each request may carry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from exporter import __version__
from exporter.budget import MAX_BATCH, OPERATING_WINDOW, OperatingBudget, Reservation
from exporter.failures import BitrixError, Code
from exporter.metrics import DURATION_BUCKETS
from exporter.throttle import PortalThrottle

__all__ = [
    "MAX_BATCH",
    "OPERATING_WINDOW",
    "BitrixClient",
    "BitrixError",
    "CallResult",
    "ClientStats",
    "Command",
    "Credential",
    "OperatingBudget",
    "PortalThrottle",
    "WebhookCredential",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a transient failure is retried: up to `max_retries` more tries, the n-th after
    `base * 2**n` seconds (at most `cap`), each delay jittered to 50-100 % so that many
    clients failing together do not come back together."""

    max_retries: int = 3
    base: float = 0.5
    cap: float = 10.0

    def delay(self, attempt: int, draw: float) -> float:
        """The wait before retry `attempt` (0-based), for a random `draw` in [0, 1)."""
        return min(self.cap, self.base * 2.0**attempt) * (0.5 + draw / 2)


DEFAULT_RETRY = RetryPolicy()


class Credential(Protocol):
    """How requests of one credential are addressed and authenticated."""

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never appear in logs, errors or responses."""
        ...

    async def target(
        self, session: aiohttp.ClientSession, method: str
    ) -> tuple[str, dict[str, str]]:
        """The URL for `method` and the extra JSON parameters (an access token) to send."""
        ...

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        """Called after `expired_token`; True if a retry may now succeed."""
        ...


@dataclass(frozen=True)
class WebhookCredential:
    """An inbound webhook: the secret is part of the URL path."""

    url: str  # always ends with "/"
    secret: str

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.secret,)

    async def target(
        self, session: aiohttp.ClientSession, method: str
    ) -> tuple[str, dict[str, str]]:
        return self.url + method, {}

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        return False


@dataclass
class ClientStats:
    """The exporter's own instrumentation of its calls to one portal."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    duration_buckets: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    duration_sum: float = 0.0
    duration_count: int = 0
    rate_limit_wait: float = 0.0
    operating: dict[str, float] = field(default_factory=dict)

    def observe_duration(self, seconds: float) -> None:
        self.duration_sum += seconds
        self.duration_count += 1
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.duration_buckets[i] += 1
                break


@dataclass(frozen=True, slots=True)
class Command:
    """One call inside a batch; `key` must not look like a number."""

    key: str
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)


# What `quote` leaves as it is (with `safe=""`): text made only of these needs no call.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def _quoted(text: str) -> str:
    return text if _UNRESERVED.fullmatch(text) else quote(text, safe="")


@lru_cache(maxsize=1024)
def _quoted_name(name: str) -> str:
    """A parameter's name (`FILTER[ACTIVE]`); the same few names come back every cycle."""
    return quote(name, safe="[]")


def php_query(params: Mapping[str, Any]) -> str:
    """Encode parameters as PHP's parse_str reads them (`FILTER[ACTIVE]=Y`, `ID[]=1`).

    >>> php_query({"userId": 7, "type": "view all", "FILTER": {"ACTIVE": True}, "ID": [1, 2]})
    'userId=7&type=view%20all&FILTER[ACTIVE]=Y&ID[]=1&ID[]=2'
    """
    pairs: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        # Plain ints and strings first: a cycle encodes tens of thousands of them, and the
        # ABC checks below cost more than the rest of the encoding.
        kind = type(value)
        if kind is int:
            text = str(value)  # digits and a minus sign: nothing to quote
        elif kind is str:
            text = _quoted(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}[{k}]", v)
            return
        elif isinstance(value, list | tuple):
            for v in value:
                walk(f"{prefix}[]", v)
            return
        elif isinstance(value, bool):
            text = (
                "Y" if value else "N"
            )  # a query string has no booleans; PHP reads "false" as true
        elif value is None:
            text = ""
        else:
            text = _quoted(str(value))
        pairs.append(f"{_quoted_name(prefix)}={text}")

    for key, value in params.items():
        walk(str(key), value)
    return "&".join(pairs)


@dataclass
class CallResult:
    """A successful single call."""

    result: Any
    total: int | None = None
    next: int | None = None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class BitrixClient:
    """Calls Bitrix24 REST methods with one credential, within the portal's limits."""

    def __init__(
        self,
        portal: str,
        credential: Credential,
        session: aiohttp.ClientSession,
        *,
        throttle: PortalThrottle,
        budget: OperatingBudget,
        stats: ClientStats,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        concurrency: int = 4,
    ) -> None:
        self.portal = portal
        self.credential = credential
        self._session = session
        self.throttle = throttle
        self.budget = budget
        self.stats = stats
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.retry = retry
        self._concurrency = asyncio.Semaphore(concurrency)
        self._in_flight = concurrency

    # -- public API -------------------------------------------------------------

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> CallResult:
        """One method call; raises BitrixError."""
        body = await self._send(method, dict(params or {}), {method: 1})
        self.budget.record(method, [body.get("time")])
        self._note_operating(method)
        return CallResult(
            result=body.get("result"),
            total=_int_or_none(body.get("total")),
            next=_int_or_none(body.get("next")),
        )

    async def batch(self, commands: Sequence[Command]) -> dict[str, Any | BitrixError]:
        """Run any number of commands in as few `batch` requests as the limits allow.

        Returns each command's `result`, or the `BitrixError` it ended with. Requests run
        concurrently (bounded); chunks hold at most 50 commands and no more calls of a method
        than its operating budget has room for.
        """
        outcome: dict[str, Any | BitrixError] = {}
        pending = list(commands)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while pending or tasks:
                # A chunk is planned (and its calls counted against the budget) only when it
                # can leave: planned far ahead, it would rely on a total that others' spending
                # may have outgrown by the time it is sent.
                room = len(tasks) < self._in_flight
                chunk, wait = self._next_chunk(pending) if room else ([], 0.0)
                if chunk:
                    reservations = self._reserve(chunk)
                    tasks.add(asyncio.create_task(self._run_chunk(chunk, reservations, outcome)))
                    continue
                if tasks:
                    done, _ = await asyncio.wait(
                        tasks, timeout=wait or None, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        tasks.discard(task)
                        task.result()
                elif wait > 0:
                    await asyncio.sleep(wait)
        finally:
            for task in tasks:
                task.cancel()
        return outcome

    # -- batching ---------------------------------------------------------------

    def _next_chunk(self, pending: list[Command]) -> tuple[list[Command], float]:
        """Take the next chunk off `pending`, or return how long to wait for budget."""
        if not pending:
            return [], 0.0
        chunk: list[Command] = []
        allowed: dict[str, int] = {}
        shortest_wait = 0.0
        skipped: list[Command] = []
        seen = 0
        # Stop at a full chunk and count calls only up to one: scanning the whole of a long
        # pending list for every chunk made a cycle of n commands cost O(n^2 / 50).
        for command in pending:
            if len(chunk) >= MAX_BATCH:
                break
            seen += 1
            if command.method not in allowed:
                same = (c for c in pending if c.method == command.method)
                wanted = sum(1 for _ in islice(same, MAX_BATCH))
                fit, wait = self.budget.calls_that_fit(command.method, wanted)
                allowed[command.method] = fit
                if fit == 0:
                    shortest_wait = wait if shortest_wait == 0 else min(shortest_wait, wait)
            if allowed[command.method] > 0:
                allowed[command.method] -= 1
                chunk.append(command)
            else:
                skipped.append(command)
        pending[:seen] = skipped
        return chunk, (0.0 if chunk else max(shortest_wait, 0.05))

    def _reserve(self, chunk: list[Command]) -> dict[str, Reservation]:
        calls = Counter(c.method for c in chunk)
        return {method: self.budget.reserve(method, n) for method, n in calls.items()}

    async def _run_chunk(
        self,
        chunk: list[Command],
        reservations: dict[str, Reservation],
        outcome: dict[str, Any | BitrixError],
    ) -> None:
        try:
            async with self._concurrency:
                # A 429 OPERATION_TIME_LIMIT may have paused a method while this chunk waited
                # for a slot: its commands fail unsent instead of hitting a blocked method.
                held = [c for c in chunk if self.budget.paused(c.method)]
                if held:
                    outcome.update({c.key: self._held(c) for c in held})
                    chunk = [c for c in chunk if not self.budget.paused(c.method)]
                results = await self._batch_request(chunk, reservations) if chunk else {}
        finally:
            for reservation in reservations.values():
                self.budget.release(reservation)
        outcome.update(results)

    async def _batch_request(
        self, chunk: list[Command], reservations: Mapping[str, Reservation]
    ) -> dict[str, Any | BitrixError]:
        calls = dict(Counter(c.method for c in chunk))
        payload = {
            "halt": 0,
            "cmd": {
                c.key: f"{c.method}?{php_query(c.params)}" if c.params else c.method for c in chunk
            },
        }
        try:
            body = await self._send("batch", payload, calls)
        except BitrixError as failure:
            return {c.key: failure for c in chunk}
        sections = body.get("result")
        if not isinstance(sections, dict):
            error = BitrixError(
                self.portal, "batch", Code.INVALID_RESPONSE, "result is not an object", 200
            )
            self.stats.errors["batch", error.error] += 1
            return {c.key: error for c in chunk}
        results = _section(sections, "result")
        errors = _section(sections, "result_error")
        times = _section(sections, "result_time")
        outcome: dict[str, Any | BitrixError] = {}
        for method in calls:
            # In call order: the growth of `operating` between the calls is their cost.
            blocks = [times.get(c.key) for c in chunk if c.method == method]
            self.budget.record(method, blocks, reservations.get(method))
        for command in chunk:
            if command.key in errors:
                outcome[command.key] = self._command_error(command, errors[command.key])
            elif command.key in results:
                outcome[command.key] = results[command.key]
            else:
                outcome[command.key] = BitrixError(
                    self.portal,
                    command.method,
                    Code.INVALID_RESPONSE,
                    "missing from batch result",
                    200,
                )
        for method in calls:
            self._note_operating(method)
        return outcome

    def _held(self, command: Command) -> BitrixError:
        """A command not sent because its method is paused (no request: not an API error)."""
        return BitrixError(
            self.portal,
            command.method,
            "OPERATION_TIME_LIMIT",
            "not sent: the method is paused until the portal's operating window resets",
        )

    def _command_error(self, command: Command, raw: object) -> BitrixError:
        code: str = Code.INVALID_RESPONSE
        description = "unreadable error"
        if isinstance(raw, dict):
            code = str(raw.get("error", "")) or "unknown"
            description = str(raw.get("error_description", ""))
        error = BitrixError(self.portal, command.method, code, self._redact(description), 200)
        self.stats.errors[command.method, code] += 1
        if code == "OPERATION_TIME_LIMIT":
            self.budget.pause(command.method)
        return error

    def _note_operating(self, method: str) -> None:
        operating = self.budget.operating(method)
        if operating is not None:
            self.stats.operating[method] = operating

    # -- one HTTP request, with retries -----------------------------------------

    async def _send(
        self, method: str, params: dict[str, Any], calls: Mapping[str, int]
    ) -> dict[str, Any]:
        """POST one request as JSON; retry what is transient; return the decoded body."""
        refreshed = False
        attempt = 0
        while True:
            try:
                return await self._attempt(method, params)
            except BitrixError as error:
                if error.error in ("expired_token", "invalid_token") and not refreshed:
                    refreshed = True
                    if await self.credential.refresh(self._session):
                        continue
                if error.error == "OPERATION_TIME_LIMIT":
                    for name in calls:
                        self.budget.pause(name)
                    raise
                if not error.retryable or attempt >= self.retry.max_retries:
                    raise
                delay = self.retry.delay(attempt, random.random())
                if error.error == "QUERY_LIMIT_EXCEEDED":
                    # Someone else drains the same bucket: give it time to leak.
                    self.throttle.pause(max(delay, 1.0 / self.throttle.requests_per_second))
                    self.stats.rate_limit_wait += delay
                log.debug("%s; retry %d in %.2fs", error, attempt + 1, delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _attempt(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        # The target first: getting it may refresh a token, which must not happen between
        # the bucket letting the request go and the request leaving.
        url, extra = await self.credential.target(self._session, method)
        ticket = await self.throttle.acquire()
        try:
            return await self._post(method, {**params, **extra}, url, ticket)
        finally:
            self.throttle.answered(ticket)

    async def _post(
        self, method: str, body: dict[str, Any], url: str, ticket: int
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | None = None
        code: str | None = None  # stays None when the request is cancelled (shutdown)
        try:
            async with self._session.post(
                url,
                json=body,
                headers={"Accept": "application/json"},
                timeout=self._timeout,
                allow_redirects=True,
            ) as response:
                # The status line is in: the portal has counted the request by now.
                self.throttle.answered(ticket)
                status = response.status
                code = str(status)
                raw = await response.read()
        except TimeoutError:
            code = Code.TIMEOUT
            raise self._fail(
                method, Code.TIMEOUT, "no answer within the request timeout", None
            ) from None
        except aiohttp.ClientError as exc:
            code = Code.CONNECTION
            reason = self._redact(f"{type(exc).__name__}: {exc}")
            raise self._fail(method, Code.CONNECTION, reason, None) from None
        finally:
            if code is not None:
                self.stats.observe_duration(loop.time() - started)
                self.stats.requests[method, code] += 1
        try:
            body = json.loads(raw)
        except ValueError:
            raise self._fail(method, Code.INVALID_RESPONSE, "body is not JSON", status) from None
        if not isinstance(body, dict):
            raise self._fail(method, Code.INVALID_RESPONSE, "body is not a JSON object", status)
        if "error" in body:
            description = body.get("error_description", "")
            raise self._fail(method, str(body["error"]), self._redact(str(description)), status)
        if status >= 400:
            raise self._fail(
                method, Code.INVALID_RESPONSE, "error status without an error body", status
            )
        return body

    def _fail(self, method: str, error: str, description: str, status: int | None) -> BitrixError:
        self.stats.errors[method, error] += 1
        return BitrixError(self.portal, method, error, description, status)

    def _redact(self, text: str) -> str:
        for secret in self.credential.secrets:
            if secret:
                text = text.replace(secret, "<secret>")
        return text


def _section(sections: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = sections.get(name)
    # PHP sends an empty section as [] and numeric keys as a list; the exporter's keys are
    # never numeric, so a list here can only be empty.
    return value if isinstance(value, dict) else {}


def user_agent() -> str:
    return f"bitrix24-exporter/{__version__}"


def new_session(*, limit: int = 100) -> aiohttp.ClientSession:
    """The process-wide HTTP session: keep-alive, bounded connections, our User-Agent."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=16, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, headers={"User-Agent": user_agent()})
