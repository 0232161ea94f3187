"""A fake Bitrix24 portal served over real HTTP, for the demo, the tests and the benchmarks.

`FakePortal` owns an `aiohttp.web.Application` that answers the REST methods the exporter
uses (`profile`, `user.get`, `user.current`, `department.get`, `im.counters.get`,
`tasks.task.counters.get`, `scope` and `batch`) the way a cloud portal does, as described
in docs/bitrix24.md: webhook URLs and OAuth access tokens (`auth`, `access_token` or a
Bearer header), query-string and body parameters merged with PHP semantics (so
`ACTIVE=false` in a form is truthy), error bodies without a `time` block, the per-portal
leaky bucket (503 `QUERY_LIMIT_EXCEEDED`), the per-credential, per-method operating budget (429
`OPERATION_TIME_LIMIT`), and PHP's JSON quirks (an empty map is `[]`). Each webhook and
application holds scopes (every one of `DEFAULT_SCOPES` unless given): `scope` lists them,
and a method outside them answers 401 `insufficient_scope`.

For alert delivery it takes `im.message.add` (into chats added with `add_chat`, which only
their members may write to, or a private dialog), `im.notify.system.add` and
`im.notify.personal.add`, with the real portal's refusals, and keeps what was sent in
`messages` and `notifications`.

It also plays the OAuth server (`GET /oauth/token/`, grant_type=refresh_token) for the
local applications added with `add_oauth_app`: each refresh issues a new access token that
expires after the app's `access_ttl` and a new refresh token, and the old refresh token
stops working at once (rotation). The token endpoint is a separate server in reality, so
the leaky bucket and `Faults` do not apply to it.

It records every HTTP request it gets and can misbehave on purpose through `Faults`:
latency, 500s, truncated JSON, nginx HTML 502 pages, hangs, connection resets and bursts of
rate-limit errors, each drawn from a seeded RNG so a run can be replayed. Two switches make
the operating budget harder to read: `operating_charge` charges every call a fixed cost that
`duration` does not show, and `start_other_client` has another integration spend the same
webhooks' budget while the exporter runs.

It deliberately imports nothing from the rest of the exporter: it plays the remote side.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final
from urllib.parse import unquote_plus

from aiohttp import web

__all__ = [
    "DEFAULT_SCOPES",
    "DEMO_DEPARTMENTS",
    "LEGACY_COUNTER_CODES",
    "NEW_COUNTER_CODES",
    "ROLES",
    "TOKEN_METHOD",
    "Credential",
    "FakeDepartment",
    "FakePortal",
    "FakeUser",
    "Faults",
    "RecordedRequest",
    "SentMessage",
    "SentNotification",
    "demo_portal",
    "parse_php_query",
    "serve",
]

ROLES: Final = (
    "view_all",
    "view_role_responsible",
    "view_role_accomplice",
    "view_role_auditor",
    "view_role_originator",
)

# Newest portals: the same three counters for every role (`total` is swallowed by the
# response envelope, see docs/bitrix24.md §6, so it never reaches the client).
NEW_COUNTER_CODES: Final = {"expired": 6291456, "new_comments": 12582912, "mentioned": 15728640}

# Portals before the tasks 20.800 rewrite: a different set of counters per role.
LEGACY_COUNTER_CODES: Final = {
    "wo_deadline": 10485760,
    "expired": 6291456,
    "expired_soon": 9437184,
    "not_viewed": 1048576,
    "wait_ctrl": 8388608,
}
_LEGACY_ROLE_COUNTERS: Final = {
    "view_all": ("wo_deadline", "expired", "expired_soon", "not_viewed", "wait_ctrl"),
    "view_role_responsible": ("wo_deadline", "expired", "expired_soon", "not_viewed"),
    "view_role_accomplice": ("expired", "expired_soon", "not_viewed"),
    "view_role_auditor": ("expired",),
    "view_role_originator": ("wo_deadline", "expired", "wait_ctrl"),
}

# What a webhook or application is granted unless `add_webhook` / `add_oauth_app` say
# otherwise: every scope a method of this fake needs.
DEFAULT_SCOPES: Final = ("department", "im", "task", "user")
# `scope` with full=true: every scope the portal knows (a real portal lists about fifty).
_ALL_SCOPES: Final = (
    *DEFAULT_SCOPES,
    "calendar",
    "crm",
    "disk",
    "entity",
    "log",
    "sonet_group",
    "user_basic",
    "user_brief",
)
# The scopes that allow a method (any one of them); methods not listed need none.
_METHOD_SCOPES: Final = {
    "user.get": ("user", "user_basic", "user_brief"),
    "user.current": ("user", "user_basic", "user_brief"),
    "department.get": ("department",),
    "im.counters.get": ("im",),
    "tasks.task.counters.get": ("task",),
    "im.message.add": ("im",),
    "im.notify.system.add": ("im",),
    "im.notify.personal.add": ("im",),
}

BATCH_MAX_LENGTH: Final = 50
PAGE_SIZE: Final = 50

# Error texts exactly as the real portal writes them.
_QUERY_LIMIT: Final = ("QUERY_LIMIT_EXCEEDED", "Too many requests")
_OPERATION_LIMIT: Final = ("OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.")
_INVALID_CREDENTIALS: Final = ("INVALID_CREDENTIALS", "Invalid request credentials")
# The description is this fake's own wording: the exact text is unconfirmed.
_INSUFFICIENT_SCOPE: Final = (
    "insufficient_scope",
    "The request requires higher privileges than provided by the webhook token",
)
_NO_AUTH: Final = ("NO_AUTH_FOUND", "Wrong authorization data")
_METHOD_NOT_FOUND: Final = ("ERROR_METHOD_NOT_FOUND", "Method not found!")
_INTERNAL: Final = ("INTERNAL_SERVER_ERROR", "Internal server error")
_BATCH_LENGTH: Final = ("ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
_BATCH_METHOD: Final = ("ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage")
_EXPIRED_TOKEN: Final = ("expired_token", "The access token provided has expired.")
_INVALID_TOKEN: Final = ("invalid_token", "The access token provided is invalid.")
_INVALID_GRANT: Final = ("invalid_grant", "Invalid refresh token")
_INVALID_CLIENT: Final = ("invalid_client", "Invalid client")
_INVALID_REQUEST: Final = ("invalid_request", "Only grant_type=refresh_token is supported")
# The `method` of token endpoint requests in `RecordedRequest` and `count`.
TOKEN_METHOD: Final = "oauth.token"
# Parameters that carry a token or a client secret: recorded as <secret>.
_SECRET_PARAMS: Final = frozenset({"auth", "access_token", "refresh_token", "client_secret"})
_GROUP_DENIED: Final = "Group not found or access denied. (internal error)"
# im.message.add and im.notify.*.add (im/classes/general/im_rest.php).
_MESSAGE_EMPTY: Final = ("MESSAGE_EMPTY", "Message can't be empty")
_MESSAGE_TYPE: Final = ("MESSAGE_EMPTY", "Wrong message type")
_USER_ID_EMPTY: Final = ("USER_ID_EMPTY", "User ID can't be empty")
_USER_NOT_FOUND: Final = ("USER_NOT_FOUND", "User not found")
_CHAT_ID_EMPTY: Final = ("CHAT_ID_EMPTY", "Chat ID can't be empty")
_CHAT_FORBIDDEN: Final = ("ACCESS_ERROR", "It is forbidden to send messages to this chat")
_PARAMS_ERROR: Final = ("PARAMS_ERROR", "Incorrect params")
# Longer messages are cut and marked, not refused (im/lib/V2/Message.php).
MESSAGE_MAX_LENGTH: Final = 20_000
_CHAT_DIALOG_RE: Final = re.compile(r"^(chat|sg|crm)\d+$", re.IGNORECASE)
# Older portals leak the PHP TypeError of the counter controller (seed page 003).
_COUNTER_PHP_FILE: Final = "/var/www/html/bitrix/modules/tasks/lib/internals/counter.php"

_HTML_502: Final = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
# What a proxy cut off mid-body looks like: valid JSON up to an arbitrary byte.
_TRUNCATED_JSON: Final = '{"result":{"TYPE":{"ALL":5,"NOTIFY":1,"CHAT":'
_JSON_CONTENT_TYPE: Final = "application/json"

# PHP (int) accepts numeric strings with surrounding whitespace.
_PHP_INT_RE: Final = re.compile(r"^\s*[+-]?\d+\s*$")


@dataclass
class FakeUser:
    """A portal user; `admin` may read everyone's task counters."""

    id: int
    name: str
    last_name: str = ""
    active: bool = True
    admin: bool = False
    user_type: str = "employee"
    # UF_DEPARTMENT: the departments the user is directly in (extranet users: none).
    departments: tuple[int, ...] = (1,)


@dataclass
class FakeDepartment:
    """A department of the company structure; `parent` None is the root, `head` None none."""

    id: int
    name: str
    parent: int | None = None
    head: int | None = None
    sort: int = 500
    active: bool = True


@dataclass
class Faults:
    """Switches that make the portal misbehave, applied to each HTTP request before handling.

    Rates are probabilities 0..1 drawn from the portal's seeded RNG in a fixed order (500,
    malformed JSON, HTML 502, hang, reset), so a seed replays the same sequence of faults.
    Change them at any time, also while the portal is serving.
    """

    latency: float = 0.0  # seconds added to every request
    http_500_rate: float = 0.0  # 500 INTERNAL_SERVER_ERROR
    malformed_json_rate: float = 0.0  # 200 with a truncated JSON body
    html_502_rate: float = 0.0  # 502 nginx HTML page, text/html
    hang_rate: float = 0.0  # wait `hang_seconds`, then answer normally
    hang_seconds: float = 60.0
    reset_rate: float = 0.0  # abort the connection without a response
    query_limit_burst: int = 0  # the next N requests get 503 QUERY_LIMIT_EXCEEDED
    operation_time_limit: bool = False  # every limited method call gets 429


@dataclass(frozen=True)
class SentMessage:
    """A message `im.message.add` posted: into a chat (`chat_id`) or a private dialog."""

    id: int
    dialog_id: str
    chat_id: int | None  # None for a private dialog with `to_user_id`
    to_user_id: int | None
    from_user_id: int
    message: str
    url_preview: bool
    system: bool


@dataclass(frozen=True)
class SentNotification:
    """A notification `im.notify.system.add` (`from_user_id` 0) or `.personal.add` added."""

    id: int
    user_id: int
    from_user_id: int
    kind: str  # "system" | "personal"
    message: str
    tag: str


@dataclass
class _Chat:
    members: set[int]
    group_id: int | None  # the workgroup whose chat this is (DIALOG_ID sgN)


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as the portal saw it.

    `status` is 0 while the request is still in flight and for a connection the portal reset.
    `error` is the Bitrix24 error code of the body, None for success and non-JSON bodies.
    """

    http_method: str
    path: str
    method: str
    params: dict[str, Any]
    commands: int
    status: int
    error: str | None
    at: float


@dataclass(frozen=True)
class Credential:
    """Who a request runs as, and which operating budget it spends.

    The budget key mirrors the real limiter: per webhook (or per OAuth application), not
    per user, so an OAuth credential kind only has to produce one of these.
    """

    user_id: int
    budget_key: str
    scopes: frozenset[str] = frozenset(DEFAULT_SCOPES)


@dataclass
class _Webhook:
    user_id: int
    revoked: bool = False
    scopes: frozenset[str] = frozenset(DEFAULT_SCOPES)


@dataclass
class _OAuthApp:
    """A local application installed by `user_id`; calls run as that user."""

    client_secret: str
    user_id: int
    access_ttl: float
    member_id: str
    scopes: frozenset[str] = frozenset(DEFAULT_SCOPES)


@dataclass
class _AccessToken:
    client_id: str
    user_id: int
    expires: float  # unix time


@dataclass(frozen=True)
class _Result:
    """What a method returns before the envelope is added."""

    result: Any
    total: int | None = None
    next: int | None = None
    # Only batch sets this: its duration is the sum of its commands'.
    duration: float | None = None


class _ApiError(Exception):
    """A Bitrix24 error body with its HTTP status."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.status = status
        self.code = code
        self.description = description

    @classmethod
    def of(cls, status: int, pair: tuple[str, str]) -> _ApiError:
        return cls(status, pair[0], pair[1])

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "error_description": self.description}


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = _JSON_CONTENT_TYPE
    error: str | None = None


@dataclass
class _OperatingBudget:
    """Seconds spent by one (credential, method) in rolling buckets, like the real limiter.

    A bucket opens on the first call after the previous one has been open for
    `window / 10` and expires `window` after that first call.
    """

    window: float
    buckets: list[list[float]] = field(default_factory=list)  # [opened_at, seconds]
    peak: float = 0.0  # the highest the sum has been

    def used(self, now: float) -> float:
        self.buckets = [b for b in self.buckets if b[0] + self.window > now]
        return sum(b[1] for b in self.buckets)

    def charge(self, now: float, seconds: float) -> None:
        self.used(now)
        if self.buckets and now < self.buckets[-1][0] + self.window / 10:
            self.buckets[-1][1] += seconds
        else:
            self.buckets.append([now, seconds])
        self.peak = max(self.peak, self.used(now))

    def resets_at(self) -> float | None:
        return self.buckets[0][0] + self.window if self.buckets else None


@dataclass
class _OtherClient:
    """Another integration spending `rate` operating seconds per second of `method`."""

    rate: float
    total: float
    method: str
    since: float | None = None  # loop time it was last accounted for (None: not yet)
    spent: float = 0.0
    refused: int = 0  # its calls that got 429 OPERATION_TIME_LIMIT


_Handler = Callable[[Credential, dict[str, Any]], _Result]


class FakePortal:
    """One fake Bitrix24 portal: its users, webhooks, counters, limits and faults.

    `requests_per_second`/`burst` set the portal's leaky bucket (None: no rate limit).
    `operating_limit` seconds per `operating_window` is the budget per credential and method
    (None: no limiter and no `operating` fields, like a self-hosted portal); every limited
    call costs `operating_cost` seconds, without sleeping, reported as its `duration` and
    charged to the budget. `operating_charge`, when set, is charged instead, whatever the
    `duration` says (a portal under load, or one that counts what the client cannot see).
    `legacy_counters` switches
    `tasks.task.counters.get` to the pre-20.800 names. `seed` drives faults and default
    counters. `clock` (default: the event loop's) times the leaky bucket, the operating budget
    and the recorded arrivals; a test passes its own to move time by hand. The constructor
    arguments stay public attributes and can be changed later.
    """

    def __init__(
        self,
        *,
        requests_per_second: float | None = 2.0,
        burst: int = 50,
        operating_limit: float | None = 480.0,
        operating_window: float = 600.0,
        operating_cost: float = 0.0,
        operating_charge: float | None = None,
        legacy_counters: bool = False,
        seed: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.requests_per_second = requests_per_second
        self.burst = burst
        self.operating_limit = operating_limit
        self.operating_window = operating_window
        self.operating_cost = operating_cost
        self.operating_charge = operating_charge
        self.legacy_counters = legacy_counters
        self.seed = seed
        self.clock = clock or _loop_time
        self.users: dict[int, FakeUser] = {}
        self.groups: set[int] = set()
        self.departments: dict[int, FakeDepartment] = {}
        # Users whose task counters every other caller is refused (`result: []`), as for
        # a user the caller neither is nor heads, even an admin.
        self.no_access_users: set[int] = set()
        # UF_DEPARTMENT as numeric strings instead of the documented ints.
        self.department_ids_as_strings = False
        self.faults = Faults()
        self.requests: list[RecordedRequest] = []
        self._rng = random.Random(seed)
        self._webhooks: dict[str, _Webhook] = {}
        self._apps: dict[str, _OAuthApp] = {}
        self._refresh_tokens: dict[str, str] = {}  # live refresh token -> client_id
        self._access_tokens: dict[str, _AccessToken] = {}
        self._issued: list[str] = []  # every token ever handed out, for leak checks
        self._tasks: dict[tuple[int, int, str], dict[str, tuple[int, int]]] = {}
        self._im: dict[int, dict[str, Any]] = {}
        self._chats: dict[int, _Chat] = {}
        self.messages: list[SentMessage] = []
        self.notifications: list[SentNotification] = []
        self._next_message_id = 1
        self._budgets: dict[tuple[str, str], _OperatingBudget] = {}
        self._other: _OtherClient | None = None
        self._bucket_level = 0.0
        self._bucket_at: float | None = None
        # Set on shutdown so hanging handlers give up instead of holding the runner for a minute.
        self._closing: asyncio.Event | None = None
        self._handlers: dict[str, _Handler] = {
            "profile": self._profile,
            "user.current": self._user_current,
            "department.get": self._department_get,
            "user.get": self._user_get,
            "im.counters.get": self._im_counters_get,
            "tasks.task.counters.get": self._task_counters_get,
            "batch": self._batch,
            "scope": self._scope,
            "im.message.add": self._message_add,
            "im.notify.system.add": partial(self._notify_add, kind="system"),
            "im.notify.personal.add": partial(self._notify_add, kind="personal"),
        }
        self.app = web.Application()
        for http_method in ("GET", "POST"):
            self.app.router.add_route(
                http_method, "/rest/{user_id}/{secret}/{method}", self._handle
            )
            # Token-based calls land here; without a token they fail with NO_AUTH_FOUND.
            self.app.router.add_route(http_method, "/rest/{method}", self._handle)
        self.app.router.add_route("GET", "/oauth/token/", self._token)
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)

    # ---- set-up API -------------------------------------------------------------------------

    def add_user(self, user: FakeUser) -> FakeUser:
        """Add a user with seed-derived task and im counters (overridable with the setters)."""
        self.users[user.id] = user
        for role in ROLES:
            self._task_counters(user.id, 0, role)
        self._im_payload(user.id)
        return user

    def add_webhook(
        self, user_id: int, secret: str, *, scopes: tuple[str, ...] = DEFAULT_SCOPES
    ) -> str:
        """Create an incoming webhook for an existing user; returns `/rest/{user_id}/{secret}/`.

        `scopes` are the ones ticked on the webhook.
        """
        if user_id not in self.users:
            raise ValueError(f"add_webhook: no user {user_id}; add_user first")
        self._webhooks[secret] = _Webhook(user_id, scopes=frozenset(scopes))
        return f"/rest/{user_id}/{secret}/"

    def add_oauth_app(
        self,
        client_id: str,
        client_secret: str,
        user_id: int,
        *,
        access_ttl: float = 3600.0,
        scopes: tuple[str, ...] = DEFAULT_SCOPES,
    ) -> str:
        """Install a local application for an existing user; returns its first refresh token.

        Access tokens it issues expire `access_ttl` seconds after they are issued
        (`expires_in` in the token response is that value rounded down to whole seconds).
        """
        if user_id not in self.users:
            raise ValueError(f"add_oauth_app: no user {user_id}; add_user first")
        # member_id names the portal, so every app of one portal shares it.
        member_id = random.Random(f"{self.seed}:member").getrandbits(128)
        self._apps[client_id] = _OAuthApp(
            client_secret, user_id, access_ttl, f"{member_id:032x}", frozenset(scopes)
        )
        return self.issue_refresh_token(client_id)

    def issue_refresh_token(self, client_id: str) -> str:
        """A new refresh token for an app, as if its user authorised it again."""
        if client_id not in self._apps:
            raise ValueError(f"issue_refresh_token: no app {client_id!r}; add_oauth_app first")
        token = secrets.token_hex(24)
        self._refresh_tokens[token] = client_id
        self._issued.append(token)
        return token

    def revoke_refresh_tokens(self, client_id: str) -> None:
        """Make every refresh token of the app fail with invalid_grant (e.g. uninstalled)."""
        for token in [t for t, c in self._refresh_tokens.items() if c == client_id]:
            del self._refresh_tokens[token]

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer 401 expired_token from now on."""
        now = time.time()
        for token in self._access_tokens.values():
            token.expires = min(token.expires, now)

    @property
    def issued_tokens(self) -> tuple[str, ...]:
        """Every access and refresh token handed out so far, live or not."""
        return tuple(self._issued)

    @property
    def token_requests(self) -> int:
        """How many requests the token endpoint got, successful or not."""
        return self.count(TOKEN_METHOD)

    def revoke_webhook(self, secret: str) -> None:
        """Make every later call with this secret fail with 401 INVALID_CREDENTIALS."""
        self._webhooks.setdefault(secret, _Webhook(0)).revoked = True

    def set_task_counters(
        self,
        user_id: int,
        role: str,
        counters: dict[str, tuple[int, int]],
        group_id: int = 0,
    ) -> None:
        """Set what `tasks.task.counters.get` returns: counter name -> (counter, code)."""
        if role not in ROLES:
            raise ValueError(f"set_task_counters: unknown role {role!r}, expected one of {ROLES}")
        if group_id > 0:
            self.groups.add(group_id)
        self._tasks[(user_id, group_id, role)] = dict(counters)

    def set_im_counters(self, user_id: int, payload: dict[str, Any]) -> None:
        """Set the whole `im.counters.get` result for this user."""
        self._im[user_id] = copy.deepcopy(payload)

    def add_chat(
        self, chat_id: int, members: tuple[int, ...], *, group_id: int | None = None
    ) -> str:
        """A group chat the `members` may write to; returns its DIALOG_ID (`chatN`).

        With `group_id` it is that workgroup's chat, also reachable as `sg{group_id}`.
        """
        self._chats[chat_id] = _Chat(set(members), group_id)
        return f"chat{chat_id}"

    def add_department(self, department: FakeDepartment) -> FakeDepartment:
        """Add a department; `department.get` lists the active ones, parents first."""
        self.departments[department.id] = department
        return department

    def add_group(self, group_id: int) -> None:
        """Make `groupId` valid for `tasks.task.counters.get`."""
        self.groups.add(group_id)

    def start_other_client(
        self, rate: float, *, total: float = float("inf"), method: str = "tasks.task.counters.get"
    ) -> None:
        """Another integration on the same webhooks spends their budget from now on.

        It runs `method` for `rate` seconds of operating time per second (until `total`
        seconds are spent), charged to every webhook's budget of that method as time passes,
        and like any client it is refused (and charged nothing) while a budget is over the
        limit. From the next request on; `rate=0` stops it.
        """
        self._other = _OtherClient(rate, total, method) if rate > 0 else None

    @property
    def other_client_spent(self) -> tuple[float, int]:
        """Seconds the other integration spent, and how many of its calls got 429."""
        return (0.0, 0) if self._other is None else (self._other.spent, self._other.refused)

    def peak_operating(self, method: str) -> float:
        """The highest `operating` any credential's budget of `method` has reached."""
        return max((b.peak for (_, m), b in self._budgets.items() if m == method), default=0.0)

    def count(self, method: str | None = None, status: int | None = None) -> int:
        """How many recorded HTTP requests match the Bitrix method and/or HTTP status."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and (status is None or r.status == status)
        )

    def advance_counters(self, rnd: random.Random) -> None:
        """Nudge a few task and im counters up or down (never below 0) so values move."""
        task_keys = sorted(self._tasks)
        for _ in range(min(3, len(task_keys))):
            counters = self._tasks[rnd.choice(task_keys)]
            if not counters:
                continue
            name = rnd.choice(sorted(counters))
            value, code = counters[name]
            counters[name] = (max(0, value + rnd.choice((-1, 1))), code)
        im_users = sorted(self._im)
        for _ in range(min(2, len(im_users))):
            _nudge_im(self._im[rnd.choice(im_users)], rnd)

    # ---- HTTP -------------------------------------------------------------------------------

    async def _on_startup(self, app: web.Application) -> None:
        # A fresh event per start: an Event is bound to the loop that first waits on it.
        self._closing = asyncio.Event()

    async def _on_shutdown(self, app: web.Application) -> None:
        if self._closing is not None:
            self._closing.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up early when the server shuts down."""
        if seconds <= 0:
            return
        if self._closing is None:
            self._closing = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        at = self.clock()
        raw_method = request.match_info["method"]
        method = _method_name(raw_method)
        params = await _read_params(request)
        commands = _count_commands(params) if method == "batch" else 1
        path = request.path
        secret = request.match_info.get("secret")
        if secret is not None:
            path = f"/rest/{request.match_info['user_id']}/<secret>/{raw_method}"
        # Keep arrival order even when answers finish out of order (latency, hangs).
        index = len(self.requests)
        shown = _masked(params)
        self.requests.append(
            RecordedRequest(request.method, path, method, shown, commands, 0, None, at)
        )
        reply = await self._respond(request, method, params)
        if reply is None:
            # Abort, then end the handler without a response: aiohttp drops the connection
            # quietly, and the client sees a disconnect instead of any status.
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        self.requests[index] = RecordedRequest(
            request.method, path, method, shown, commands, reply.status, reply.error, at
        )
        return web.Response(
            status=reply.status,
            body=reply.body,
            content_type=reply.content_type,
            charset="utf-8",
        )

    async def _respond(
        self, request: web.Request, method: str, params: dict[str, Any]
    ) -> _Reply | None:
        faults = self.faults
        await self._pause(faults.latency)
        # Always draw all five so one request consumes the same randomness whatever is on.
        draws = [self._rng.random() for _ in range(5)]
        if draws[0] < faults.http_500_rate:
            return _error_reply(_ApiError.of(500, _INTERNAL))
        if draws[1] < faults.malformed_json_rate:
            return _Reply(200, _TRUNCATED_JSON.encode())
        if draws[2] < faults.html_502_rate:
            return _Reply(502, _HTML_502.encode(), content_type="text/html")
        if draws[3] < faults.hang_rate:
            await self._pause(faults.hang_seconds)
        if draws[4] < faults.reset_rate:
            return None
        if faults.query_limit_burst > 0:
            faults.query_limit_burst -= 1
            return _error_reply(_ApiError.of(503, _QUERY_LIMIT))
        if not self._take_token():
            return _error_reply(_ApiError.of(503, _QUERY_LIMIT))
        try:
            credential = self._authenticate(request, params)
            result, time_block = self._invoke(credential, method, params, in_batch=False)
        except _ApiError as exc:
            return _error_reply(exc)
        body: dict[str, Any] = {"result": result.result}
        if result.total is not None:
            body["total"] = result.total
        if result.next is not None:
            body["next"] = result.next
        body["time"] = time_block
        return _Reply(200, _php_json(body))

    def _take_token(self) -> bool:
        """The portal's leaky bucket: False means 503 QUERY_LIMIT_EXCEEDED."""
        if self.requests_per_second is None:
            return True
        now = self.clock()
        if self._bucket_at is not None:
            drained = (now - self._bucket_at) * self.requests_per_second
            self._bucket_level = max(0.0, self._bucket_level - drained)
        self._bucket_at = now
        if self._bucket_level + 1 > self.burst:
            return False
        self._bucket_level += 1
        return True

    def _authenticate(self, request: web.Request, params: dict[str, Any]) -> Credential:
        """Find who the request runs as; each credential kind is one branch here."""
        secret = request.match_info.get("secret")
        if secret is not None:
            hook = self._webhooks.get(secret)
            if hook is None or hook.revoked or str(hook.user_id) != request.match_info["user_id"]:
                raise _ApiError.of(401, _INVALID_CREDENTIALS)
            return Credential(hook.user_id, f"webhook:{secret}", hook.scopes)
        token = _access_token(request, params)
        if token is None:
            raise _ApiError.of(401, _NO_AUTH)
        issued = self._access_tokens.get(token)
        if issued is None or issued.client_id not in self._apps:
            raise _ApiError.of(401, _INVALID_TOKEN)
        if issued.expires <= time.time():
            raise _ApiError.of(401, _EXPIRED_TOKEN)
        # The real limiter keys OAuth calls by application, whichever user's token it is.
        app = self._apps[issued.client_id]
        return Credential(issued.user_id, f"app:{issued.client_id}", app.scopes)

    # ---- the OAuth server -------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        at = self.clock()
        params = {k: request.query[k] for k in request.query}
        shown = _masked(params)
        index = len(self.requests)
        self.requests.append(
            RecordedRequest(request.method, request.path, TOKEN_METHOD, shown, 1, 0, None, at)
        )
        try:
            status, body = 200, self._grant(params, f"{request.scheme}://{request.host}")
        except _ApiError as exc:
            status, body = exc.status, exc.body()
        self.requests[index] = RecordedRequest(
            request.method, request.path, TOKEN_METHOD, shown, 1, status, body.get("error"), at
        )
        return web.Response(
            status=status, body=_php_json(body), content_type=_JSON_CONTENT_TYPE, charset="utf-8"
        )

    def _grant(self, params: dict[str, str], base: str) -> dict[str, Any]:
        """Rotate a refresh token: a new access token and a new refresh token, old one dead."""
        if params.get("grant_type") != "refresh_token":
            raise _ApiError.of(400, _INVALID_REQUEST)
        client_id = params.get("client_id", "")
        app = self._apps.get(client_id)
        if app is None or params.get("client_secret") != app.client_secret:
            raise _ApiError.of(401, _INVALID_CLIENT)
        old = params.get("refresh_token", "")
        if self._refresh_tokens.get(old) != client_id:
            raise _ApiError.of(400, _INVALID_GRANT)
        del self._refresh_tokens[old]
        access = secrets.token_hex(24)
        self._issued.append(access)
        now = time.time()
        self._access_tokens[access] = _AccessToken(client_id, app.user_id, now + app.access_ttl)
        return {
            "access_token": access,
            "expires": int(now + app.access_ttl),
            "expires_in": int(app.access_ttl),
            "scope": ",".join(sorted(app.scopes)),
            "domain": base.split("://", 1)[1],
            "server_endpoint": f"{base}/rest/",
            "status": "L",  # a local application
            "client_endpoint": f"{base}/rest/",
            "member_id": app.member_id,
            "user_id": app.user_id,
            "refresh_token": self.issue_refresh_token(client_id),
        }

    def _invoke(
        self, credential: Credential, method: str, params: dict[str, Any], *, in_batch: bool
    ) -> tuple[_Result, dict[str, Any]]:
        """Run one method call (top-level or a batch command) and build its time block."""
        if in_batch and method == "batch":
            raise _ApiError.of(405, _BATCH_METHOD)
        handler = self._handlers.get(method)
        if handler is None:
            raise _ApiError.of(404, _METHOD_NOT_FOUND)
        needed = _METHOD_SCOPES.get(method)
        if needed is not None and credential.scopes.isdisjoint(needed):
            raise _ApiError.of(401, _INSUFFICIENT_SCOPE)
        loop_now = self.clock()
        started = time.time()
        self._spend_elsewhere(loop_now)
        # `batch` is exempt from the limiter; its commands are charged one by one.
        limited = method != "batch"
        if limited and self.faults.operation_time_limit:
            raise _ApiError.of(429, _OPERATION_LIMIT)
        budget = self._budgets.setdefault(
            (credential.budget_key, method), _OperatingBudget(self.operating_window)
        )
        # Checked before the call, so the call that crosses the limit still runs.
        over = self.operating_limit is not None and budget.used(loop_now) > self.operating_limit
        if limited and over:
            raise _ApiError.of(429, _OPERATION_LIMIT)
        cost = self.operating_cost if limited else 0.0
        charge = cost if self.operating_charge is None or not limited else self.operating_charge
        budget.charge(loop_now, charge)
        result = handler(credential, params)
        processing = time.time() - started
        duration = result.duration if result.duration is not None else cost
        finish = started + duration
        block: dict[str, Any] = {
            "start": started,
            "finish": finish,
            "duration": duration,
            "processing": processing,
            "date_start": _iso(started),
            "date_finish": _iso(finish),
        }
        if self.operating_limit is not None:
            resets_at = budget.resets_at()
            if resets_at is not None:
                block["operating_reset_at"] = round(started + (resets_at - loop_now))
            block["operating"] = budget.used(loop_now)
        return result, block

    def _spend_elsewhere(self, now: float) -> None:
        """Charge what the other integration spent since the last request, in steps of time."""
        other = self._other
        if other is None:
            return
        if other.since is None:
            other.since = now
            return
        step = self.operating_window / 100  # a tenth of a bucket: lands in the right bucket
        keys = [f"webhook:{secret}" for secret, hook in self._webhooks.items() if not hook.revoked]
        at = other.since
        while at < now and other.spent < other.total:
            span = min(step, now - at)
            at += span
            seconds = min(other.rate * span, other.total - other.spent)
            for key in keys:
                budget = self._budgets.setdefault(
                    (key, other.method), _OperatingBudget(self.operating_window)
                )
                if self.operating_limit is not None and budget.used(at) > self.operating_limit:
                    other.refused += 1
                    continue
                budget.charge(at, seconds)
            other.spent += seconds
        other.since = now

    # ---- methods ----------------------------------------------------------------------------

    def _caller(self, credential: Credential) -> FakeUser:
        user = self.users.get(credential.user_id)
        if user is None:
            # The webhook outlived its user: the real portal refuses such credentials.
            raise _ApiError.of(401, _INVALID_CREDENTIALS)
        return user

    def _profile(self, credential: Credential, params: dict[str, Any]) -> _Result:
        user = self._caller(credential)
        if not user.active:
            return _Result([])
        return _Result(
            {
                # A string, as in the docs and the source (`$userInfo['ID']` from the DB row).
                "ID": str(user.id),
                "ADMIN": user.admin,
                "NAME": user.name,
                "LAST_NAME": user.last_name,
                "PERSONAL_GENDER": "",
                "TIME_ZONE": "",
                "TIME_ZONE_OFFSET": 0,
            }
        )

    def _user_current(self, credential: Credential, params: dict[str, Any]) -> _Result:
        return _Result(self._user_row(self._caller(credential)))

    def _user_get(self, credential: Credential, params: dict[str, Any]) -> _Result:
        self._caller(credential)
        query = {str(k).upper(): v for k, v in params.items()}
        if "FILTER" in query:
            raw = query["FILTER"]
            conditions = (
                {str(k).upper(): v for k, v in raw.items()} if isinstance(raw, dict) else {}
            )
        else:
            conditions = query
        users = [u for _, u in sorted(self.users.items()) if _user_matches(u, conditions)]
        start = _php_intval(query.get("START", 0))
        if start < 0:
            # start=-1 skips the count: no total, no next, first page only.
            return _Result([self._user_row(u) for u in users[:PAGE_SIZE]])
        offset = start // PAGE_SIZE * PAGE_SIZE
        page = [self._user_row(u) for u in users[offset : offset + PAGE_SIZE]]
        following = offset + PAGE_SIZE
        return _Result(page, total=len(users), next=following if following < len(users) else None)

    def _user_row(self, user: FakeUser) -> dict[str, Any]:
        row = _user_record(user)
        if self.department_ids_as_strings:
            row["UF_DEPARTMENT"] = [str(d) for d in row["UF_DEPARTMENT"]]
        return row

    def _department_get(self, credential: Credential, params: dict[str, Any]) -> _Result:
        self._caller(credential)
        # Filter keys are upper case and matched as written (the portal's own check is
        # case-sensitive); `sort` and `order` are lower case, `START` pages.
        raw = params.get("FILTER")
        conditions = raw if isinstance(raw, dict) else params
        rows = [d for d in self._tree_order() if d.active and _department_matches(d, conditions)]
        sort = params.get("sort")
        if isinstance(sort, str) and sort.upper() in _DEPARTMENT_FIELDS:
            descending = str(params.get("order", "ASC")).upper() == "DESC"
            rows.sort(key=lambda d: _department_sort_key(d, sort.upper()), reverse=descending)
        start = params.get("START", params.get("start", 0))
        offset = max(0, _php_intval(start)) // PAGE_SIZE * PAGE_SIZE
        page = [_department_record(d) for d in rows[offset : offset + PAGE_SIZE]]
        following = offset + PAGE_SIZE
        return _Result(page, total=len(rows), next=following if following < len(rows) else None)

    def _tree_order(self) -> list[FakeDepartment]:
        """Every department, each parent before its children (Bitrix24's default order)."""
        children: dict[int | None, list[FakeDepartment]] = {}
        for department in self.departments.values():
            parent = department.parent if department.parent in self.departments else None
            children.setdefault(parent, []).append(department)
        ordered: list[FakeDepartment] = []
        stack = sorted(children.get(None, []), key=lambda d: (d.sort, d.id), reverse=True)
        while stack:
            department = stack.pop()
            ordered.append(department)
            below = sorted(children.get(department.id, []), key=lambda d: (d.sort, d.id))
            stack.extend(reversed(below))
        return ordered

    def _im_counters_get(self, credential: Credential, params: dict[str, Any]) -> _Result:
        # No user parameter exists: the handler always reads the caller's own counters.
        self._caller(credential)
        return _Result(copy.deepcopy(self._im_payload(credential.user_id)))

    def _task_counters_get(self, credential: Credential, params: dict[str, Any]) -> _Result:
        caller = self._caller(credential)
        user_id = _php_int_arg(params.get("userId"), 1, "userId", 0)
        group_id = _php_int_arg(params.get("groupId"), 2, "groupId", 0)
        role = params.get("type", "view_all")
        if group_id > 0 and group_id not in self.groups:
            raise _ApiError(400, "0", _GROUP_DENIED)
        target = user_id or caller.id
        if target != caller.id and (not caller.admin or target in self.no_access_users):
            return _Result([])
        if target not in self.users or role not in ROLES:
            return _Result([])
        counters = self._task_counters(target, group_id, role)
        result = {
            name: {"counter": value, "code": code} for name, (value, code) in counters.items()
        }
        # The built-in `total` counter collides with the envelope's `total` and becomes 1.
        return _Result(result, total=1)

    def _message_add(self, credential: Credential, params: dict[str, Any]) -> _Result:
        """`im.message.add` as im_rest.php `messageAdd` checks it, recorded in `messages`."""
        caller = self._caller(credential)
        query = {str(k).upper(): v for k, v in params.items()}
        message = _message_text(query)
        dialog = str(query.get("DIALOG_ID", "")).strip()
        chat_id: int | None = None
        to_user: int | None = None
        if _CHAT_DIALOG_RE.match(dialog):
            chat_id = self._chat_of(dialog)
            if chat_id <= 0:
                raise _ApiError.of(400, _CHAT_ID_EMPTY)
            chat = self._chats.get(chat_id)
            # An unknown chatN is not told apart from a chat the caller may not write to.
            if chat is None or caller.id not in chat.members:
                raise _ApiError.of(403, _CHAT_FORBIDDEN)
        elif dialog:
            to_user = _php_intval(dialog)
            if to_user <= 0:
                raise _ApiError.of(400, _USER_ID_EMPTY)
            if to_user not in self.users:
                raise _ApiError.of(400, _USER_NOT_FOUND)
        else:
            raise _ApiError.of(400, _PARAMS_ERROR)
        if len(message) > MESSAGE_MAX_LENGTH:
            message = message[:MESSAGE_MAX_LENGTH] + " (...)"
        sent = SentMessage(
            id=self._new_message_id(),
            dialog_id=dialog,
            chat_id=chat_id,
            to_user_id=to_user,
            from_user_id=caller.id,
            message=message,
            url_preview=str(query.get("URL_PREVIEW", "Y")) != "N",
            system=str(query.get("SYSTEM", "N")) == "Y",
        )
        self.messages.append(sent)
        return _Result(sent.id)

    def _chat_of(self, dialog: str) -> int:
        lowered = dialog.lower()
        if lowered.startswith("sg"):
            group = int(lowered[2:])
            return next((i for i, c in self._chats.items() if c.group_id == group), 0)
        if lowered.startswith("crm"):
            return 0
        return int(lowered[4:])

    def _notify_add(self, credential: Credential, params: dict[str, Any], *, kind: str) -> _Result:
        """`im.notify.system.add` / `.personal.add` (im_rest.php `notifyAdd`).

        TAG is recorded but de-duplicates nothing: the real portal applies TAG and SUB_TAG
        only to OAuth applications, never to webhooks.
        """
        caller = self._caller(credential)
        query = {str(k).upper(): v for k, v in params.items()}
        user_id = _php_intval(query.get("TO", query.get("USER_ID")))
        if user_id <= 0:
            raise _ApiError.of(400, _USER_ID_EMPTY)
        message = _message_text(query)
        user = self.users.get(user_id)
        if user is None or not user.active:
            # CIMNotify::Add fails for a user it cannot find and the method passes its
            # `false` on as the result.
            return _Result(False)
        sent = SentNotification(
            id=self._new_message_id(),
            user_id=user_id,
            from_user_id=0 if kind == "system" else caller.id,
            kind=kind,
            message=message,
            tag=str(query.get("TAG", "")),
        )
        self.notifications.append(sent)
        return _Result(sent.id)

    def _new_message_id(self) -> int:
        self._next_message_id += 1
        return self._next_message_id - 1

    def _scope(self, credential: Credential, params: dict[str, Any]) -> _Result:
        # No scope needed; full=true lists every scope the portal knows instead.
        self._caller(credential)
        query = {str(k).upper(): v for k, v in params.items()}
        if query.get("FULL") in (True, 1, "true", "Y", "1"):
            return _Result(list(_ALL_SCOPES))
        return _Result(sorted(credential.scopes))

    def _batch(self, credential: Credential, params: dict[str, Any]) -> _Result:
        query = {str(k).upper(): v for k, v in params.items()}
        halt = _php_truthy(query.get("HALT", False))
        raw = query.get("CMD")
        items: list[tuple[str, Any]]
        if isinstance(raw, dict):
            items = [(str(k), v) for k, v in raw.items()]
        elif isinstance(raw, list):
            items = [(str(i), v) for i, v in enumerate(raw)]
        else:
            items = []
        sections: dict[str, dict[str, Any]] = {
            "result": {},
            "result_error": {},
            "result_total": {},
            "result_next": {},
            "result_time": {},
        }
        duration = 0.0
        for position, (key, call) in enumerate(items):
            failed = False
            if position >= BATCH_MAX_LENGTH:
                sections["result_error"][key] = _ApiError.of(400, _BATCH_LENGTH).body()
                failed = True
            elif not isinstance(call, str):
                continue  # the real server skips non-string commands silently
            else:
                path, _, command_query = call.partition("?")
                try:
                    result, block = self._invoke(
                        credential,
                        path.strip().lower(),
                        parse_php_query(command_query),
                        in_batch=True,
                    )
                except _ApiError as exc:
                    sections["result_error"][key] = exc.body()
                    failed = True
                else:
                    sections["result"][key] = result.result
                    if result.total is not None:
                        sections["result_total"][key] = result.total
                    if result.next is not None:
                        sections["result_next"][key] = result.next
                    sections["result_time"][key] = block
                    duration += block["duration"]
            if failed and halt:
                break
        return _Result(sections, duration=duration)

    # ---- counter state ----------------------------------------------------------------------

    def _task_counters(self, user_id: int, group_id: int, role: str) -> dict[str, tuple[int, int]]:
        key = (user_id, group_id, role)
        if key not in self._tasks:
            self._tasks[key] = self._derived_task_counters(user_id, group_id, role)
        return self._tasks[key]

    def _derived_task_counters(
        self, user_id: int, group_id: int, role: str
    ) -> dict[str, tuple[int, int]]:
        # A string seed keeps values stable across runs (str seeds are hashed with SHA-512).
        rng = random.Random(f"{self.seed}:tasks:{user_id}:{group_id}:{role}")
        top = 4 if group_id else 9
        if self.legacy_counters:
            names = _LEGACY_ROLE_COUNTERS[role]
            return {n: (rng.randint(0, top), LEGACY_COUNTER_CODES[n]) for n in names}
        return {n: (rng.randint(0, top), code) for n, code in NEW_COUNTER_CODES.items()}

    def _im_payload(self, user_id: int) -> dict[str, Any]:
        if user_id not in self._im:
            self._im[user_id] = _derived_im_payload(
                random.Random(f"{self.seed}:im:{user_id}"), user_id
            )
        return self._im[user_id]


# ---- module helpers -------------------------------------------------------------------------


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


# The demo company: four levels, a department without a head (Support, Key Accounts).
DEMO_DEPARTMENTS: Final = (
    FakeDepartment(1, "Acme", None, head=1),
    FakeDepartment(2, "Sales", 1, head=2),
    FakeDepartment(3, "Support", 1),
    FakeDepartment(4, "Field Sales", 2, head=3),
    FakeDepartment(5, "R&D", 1, head=5),
    FakeDepartment(6, "Key Accounts", 4),
)
# Who is where; user 3 is in two departments. Later users go round the departments.
_DEMO_MEMBERSHIPS: Final = {1: (1,), 2: (2,), 3: (4, 3), 4: (6,), 5: (5,), 6: (3,)}


def demo_portal(*, users: int = 6, seed: int = 1) -> tuple[FakePortal, str]:
    """A portal with named users (user 1 is admin), non-zero counters and the
    `DEMO_DEPARTMENTS` tree.

    Returns the portal and the webhook path of user 1. Rate limits are the standard plan's.
    """
    names = [
        ("Anna", "Ivanova"),
        ("Boris", "Petrov"),
        ("Clara", "Schmidt"),
        ("Dmitry", "Sokolov"),
        ("Elena", "Morozova"),
        ("Farid", "Aliyev"),
        ("Galina", "Orlova"),
        ("Hugo", "Martin"),
    ]
    portal = FakePortal(seed=seed)
    rng = random.Random(seed)
    portal.add_group(7)
    for department in DEMO_DEPARTMENTS:
        portal.add_department(copy.copy(department))
    for user_id in range(1, users + 1):
        name, last_name = (
            names[user_id - 1] if user_id <= len(names) else (f"User{user_id}", "Demo")
        )
        departments = _DEMO_MEMBERSHIPS.get(user_id) or (DEMO_DEPARTMENTS[user_id % 6].id,)
        portal.add_user(
            FakeUser(user_id, name, last_name, admin=user_id == 1, departments=departments)
        )
        for role in ROLES:
            portal.set_task_counters(
                user_id,
                role,
                {n: (rng.randint(1, 9), code) for n, code in NEW_COUNTER_CODES.items()},
            )
        portal.set_task_counters(
            user_id,
            "view_all",
            {n: (rng.randint(1, 4), code) for n, code in NEW_COUNTER_CODES.items()},
            group_id=7,
        )
        partner = 2 if user_id == 1 else 1
        payload: dict[str, Any] = {
            "TYPE": {"NOTIFY": rng.randint(1, 3)},
            "CHAT": {str(10 + user_id): rng.randint(1, 5)},
            "CHAT_MUTED": {"90": rng.randint(1, 9)},
            "CHAT_UNREAD": [],
            "LINES": {},
            "DIALOG": {str(partner): rng.randint(1, 4)},
            "DIALOG_UNREAD": [],
        }
        _recompute_im_totals(payload)
        portal.set_im_counters(user_id, payload)
    path = portal.add_webhook(1, f"demo{seed}webhooksecret")
    return portal, path


async def serve(
    portal: FakePortal, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Start the portal on a real socket; returns the runner (call `cleanup()`) and base URL."""
    # No access log: the fake's request lines carry webhook secrets in their paths, and
    # they are the portal's logs, not the exporter's.
    runner = web.AppRunner(portal.app, shutdown_timeout=5.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound_port}"


def parse_php_query(query: str) -> dict[str, Any]:
    """Parse a query string the way PHP's `parse_str` does.

    Nested keys (`FILTER[ACTIVE]=Y`) become dicts, `select[]=ID` appends, values stay
    strings, a later duplicate wins, and arrays indexed 0..n-1 come out as lists.
    """
    root: dict[str, Any] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        raw_name, _, raw_value = pair.partition("=")
        name, value = unquote_plus(raw_name), unquote_plus(raw_value)
        bracket = name.find("[")
        base = name if bracket < 0 else name[:bracket]
        if not base:
            continue
        keys = [base.replace(".", "_").replace(" ", "_")]
        rest = "" if bracket < 0 else name[bracket:]
        while rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                break
            keys.append(rest[1:close])
            rest = rest[close + 1 :]
        node = root
        for key in keys[:-1]:
            slot = key if key else _next_index(node)
            child = node.get(slot)
            if not isinstance(child, dict):
                child = {}
                node[slot] = child
            node = child
        node[keys[-1] if keys[-1] else _next_index(node)] = value
    listed = _php_arrays(root)
    assert isinstance(listed, dict)
    return listed


def _next_index(node: dict[str, Any]) -> str:
    indexes = [int(k) for k in node if re.fullmatch(r"-?\d+", k)]
    return str(max(indexes) + 1 if indexes else 0)


def _php_arrays(value: Any) -> Any:
    """Turn PHP-array dicts keyed 0..n-1 into lists, as json_encode would show them."""
    if isinstance(value, dict):
        converted = {str(k): _php_arrays(v) for k, v in value.items()}
        if converted and list(converted) == [str(i) for i in range(len(converted))]:
            return list(converted.values())
        return converted
    if isinstance(value, list):
        return [_php_arrays(v) for v in value]
    return value


def _php_json(value: Any) -> bytes:
    """Serialise like PHP's json_encode: empty maps are `[]`, 0..n-1 maps are lists, `\\/`."""

    def convert(item: Any) -> Any:
        if isinstance(item, dict):
            if not item:
                return []
            return _php_arrays({str(k): convert(v) for k, v in item.items()})
        if isinstance(item, list | tuple):
            return [convert(v) for v in item]
        return item

    text = json.dumps(convert(value), separators=(",", ":"))
    # json_encode escapes slashes by default; clients must not care, so show it.
    return text.replace("/", "\\/").encode()


def _error_reply(exc: _ApiError) -> _Reply:
    return _Reply(exc.status, _php_json(exc.body()), error=exc.code)


async def _read_params(request: web.Request) -> dict[str, Any]:
    """Query string and body merged, body winning; a broken JSON body counts as empty."""
    params = parse_php_query(request.query_string)
    body = await request.read()
    if not body:
        return params
    if request.content_type == _JSON_CONTENT_TYPE:
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        params.update(decoded if isinstance(decoded, dict) else {})
    else:
        params.update(parse_php_query(body.decode("utf-8", "replace")))
    return params


def _access_token(request: web.Request, params: dict[str, Any]) -> str | None:
    """The OAuth token of a call: the Bearer header first, then `auth`, then `access_token`."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer " and header[7:].strip():
        return header[7:].strip()
    for name in ("auth", "access_token"):
        value = params.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _masked(params: dict[str, Any]) -> dict[str, Any]:
    return {k: "<secret>" if k in _SECRET_PARAMS else v for k, v in params.items()}


def _method_name(raw: str) -> str:
    name = raw.lower()
    return name[: -len(".json")] if name.endswith(".json") else name


def _count_commands(params: dict[str, Any]) -> int:
    for key, value in params.items():
        if str(key).upper() == "CMD" and isinstance(value, dict | list):
            return len(value)
    return 0


def _php_truthy(value: Any) -> bool:
    """PHP's boolean cast: "0", "", 0, empty arrays and null are false; "false" is true."""
    if value is None or value is False:
        return False
    if isinstance(value, str):
        return value not in ("", "0")
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, dict | list):
        return bool(value)
    return True


def _php_intval(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        match = re.match(r"\s*[+-]?\d+", value)
        return int(match.group()) if match else 0
    return 0


def _php_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict | list):
        return "array"
    return "null"


def _php_int_arg(value: Any, position: int, name: str, default: int) -> int:
    """Bind an `int` controller argument with PHP's coercive typing, or fail like PHP."""
    if value is None:
        return default
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _PHP_INT_RE.match(value):
        return int(value)
    raise _ApiError(
        400,
        "0",
        f"Argument #{position} (${name}) must be of type int, {_php_type(value)} given, "
        f"called in {_COUNTER_PHP_FILE} on line 78 (internal error)",
    )


def _message_text(query: dict[str, Any]) -> str:
    """MESSAGE of im.message.add / im.notify.*: a non-empty string once trimmed."""
    message = query.get("MESSAGE")
    if message is not None and not isinstance(message, str):
        raise _ApiError.of(400, _MESSAGE_TYPE)
    text = (message or "").strip()
    if not text:
        raise _ApiError.of(400, _MESSAGE_EMPTY)
    return text


def _user_record(user: FakeUser) -> dict[str, Any]:
    return {
        "ID": str(user.id),
        "ACTIVE": user.active,
        "NAME": user.name,
        "LAST_NAME": user.last_name,
        "SECOND_NAME": "",
        "USER_TYPE": user.user_type,
        "UF_DEPARTMENT": list(user.departments) if user.user_type == "employee" else [],
    }


def _department_record(department: FakeDepartment) -> dict[str, Any]:
    # Only set fields are copied: no PARENT on the root, no UF_HEAD without a head; ids
    # are strings and SORT an int, as the real portal sends them.
    row: dict[str, Any] = {"ID": str(department.id), "NAME": department.name}
    row["SORT"] = department.sort
    if department.parent is not None:
        row["PARENT"] = str(department.parent)
    if department.head is not None:
        row["UF_HEAD"] = str(department.head)
    return row


_DEPARTMENT_FIELDS: Final = ("ID", "NAME", "SORT", "PARENT", "UF_HEAD")


def _department_matches(department: FakeDepartment, conditions: dict[str, Any]) -> bool:
    fields = {
        "ID": department.id,
        "NAME": department.name,
        "SORT": department.sort,
        "PARENT": department.parent,
        "UF_HEAD": department.head,
    }
    for key, value in fields.items():
        if key not in conditions:
            continue
        wanted = conditions[key]
        if isinstance(wanted, dict):
            wanted = list(wanted.values())
        options = wanted if isinstance(wanted, list) else [wanted]
        if str(value if value is not None else "") not in {str(o).strip() for o in options}:
            return False
    return True


def _department_sort_key(department: FakeDepartment, field_name: str) -> tuple[int, str]:
    if field_name == "NAME":
        return (0, department.name)
    numbers = {"ID": department.id, "SORT": department.sort, "PARENT": department.parent}
    return (numbers.get(field_name, department.head) or 0, "")


def _user_matches(user: FakeUser, conditions: dict[str, Any]) -> bool:
    if "ACTIVE" in conditions:
        raw = conditions["ACTIVE"]
        # The trap: anything truthy that is not "N" means Y, so the string "false" is Y.
        wanted = _php_truthy(raw) and raw != "N"
        if user.active != wanted:
            return False
    if "USER_TYPE" in conditions and user.user_type != conditions["USER_TYPE"]:
        return False
    if "ID" in conditions:
        raw_ids = conditions["ID"]
        if isinstance(raw_ids, dict):
            raw_ids = list(raw_ids.values())
        ids = raw_ids if isinstance(raw_ids, list) else [raw_ids]
        if str(user.id) not in {str(v).strip() for v in ids}:
            return False
    return all(
        key not in conditions or str(conditions[key]) == value
        for key, value in (("NAME", user.name), ("LAST_NAME", user.last_name))
    )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")


def _derived_im_payload(rng: random.Random, user_id: int) -> dict[str, Any]:
    """An `im.counters.get` result in the shape of the current docs, with consistent totals."""
    partner = 2 if user_id == 1 else 1
    chat = {str(rng.randint(10, 60)): rng.randint(1, 5)} if rng.random() < 0.7 else {}
    dialog = {str(partner): rng.randint(1, 4)} if rng.random() < 0.7 else {}
    payload: dict[str, Any] = {
        "TYPE": {"NOTIFY": rng.randint(0, 3)},
        "CHAT": chat,
        "CHAT_MUTED": {str(rng.randint(61, 99)): rng.randint(1, 9)},
        "CHAT_UNREAD": [],
        "LINES": {},
        "DIALOG": dialog,
        "DIALOG_UNREAD": [],
    }
    _recompute_im_totals(payload)
    return payload


def _section(payload: dict[str, Any], name: str) -> dict[str, Any]:
    value = payload.get(name)
    return value if isinstance(value, dict) else {}


def _recompute_im_totals(payload: dict[str, Any]) -> None:
    # Muted chats count nowhere, and ALL = MESSENGER + NOTIFY (docs/bitrix24.md §5).
    kind = payload.get("TYPE")
    if not isinstance(kind, dict):
        return
    chat = sum(_section(payload, "CHAT").values())
    dialog = sum(_section(payload, "DIALOG").values())
    lines = sum(_section(payload, "LINES").values())
    notify = int(kind.get("NOTIFY", 0))
    messenger = chat + dialog + lines
    totals = {
        "ALL": messenger + notify,
        "NOTIFY": notify,
        "CHAT": chat,
        "DIALOG": dialog,
        "LINES": lines,
        "MESSENGER": messenger,
    }
    # Keys this fake does not compute (COPILOT, COLLAB, ...) pass through unchanged.
    payload["TYPE"] = totals | {k: v for k, v in kind.items() if k not in totals}


def _nudge_im(payload: dict[str, Any], rnd: random.Random) -> None:
    """Move one unread count of a map section (or NOTIFY) by one, dropping zeros like PHP."""
    kind = payload.get("TYPE")
    sections = [
        name
        for name in ("CHAT", "DIALOG")
        if isinstance(payload.get(name), dict) or payload.get(name) == []
    ]
    if isinstance(kind, dict) and (not sections or rnd.random() < 0.3):
        kind["NOTIFY"] = max(0, int(kind.get("NOTIFY", 0)) + rnd.choice((-1, 1)))
    elif sections:
        name = rnd.choice(sections)
        entries = _section(payload, name)
        if entries and rnd.random() < 0.8:
            key = rnd.choice(sorted(entries))
            entries[key] = entries[key] + rnd.choice((-1, 1))
            if entries[key] <= 0:
                del entries[key]
        else:
            key = str(rnd.randint(2, 9) if name == "DIALOG" else rnd.randint(10, 60))
            entries[key] = entries.get(key, 0) + 1
        payload[name] = entries
    _recompute_im_totals(payload)
