"""`bitrix24-exporter doctor`: check a config against the real portals before running it.

For each portal, in this order, one line per check, OK, WARN or FAIL (SKIP where an earlier
failure leaves nothing to check), with the fix in words under every WARN and FAIL:

1. ``reachable``: the host name resolves, TCP and TLS connect, HTTP answers (for OAuth, the
   OAuth server too);
2. ``credential``: the webhook is accepted; for OAuth, the state file is writable and the
   token works (refreshed when it has to be);
3. ``owner``: whose credential it is and what that allows (`users: all` needs an admin);
4. ``scopes``: Bitrix24's ``scope`` method against the scopes the configured features need,
   then each extra ``im.webhooks`` entry (``im webhook``);
5. ``users``: how many users the config selects;
6. ``rate limit``: requests per cycle, the shortest cycle the portal's bucket allows from
   idle and sustained, against ``poll_interval``;
7. ``operating``: one real call of each method, its cost from the answer's ``time`` block
   projected to seconds per 10 minutes against ``operating_limit``;
8. ``alert receivers``, where the config has them.

Where the load does not fit, every fix names one ``poll_interval`` that fits all of it.

Cost: a handful of requests per portal plus the user pages, sent through the same
`BitrixClient` as polling (rate limit, bounded retries). Only reading methods are called;
nothing is posted. No secret is printed: URLs are redacted, error texts are redacted by the
client, and `format_text` / `format_json` pass everything through the log mask as well.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import ssl
import tempfile
import time
from typing import Final
from urllib.parse import urlsplit

import aiohttp

from exporter.bitrix import (
    MAX_BATCH,
    BitrixClient,
    ClientStats,
    Command,
    OperatingBudget,
    PortalThrottle,
    RetryPolicy,
)
from exporter.clients import credential_for
from exporter.config import (
    AlertReceiver,
    Config,
    DepartmentUsers,
    OAuthAuth,
    Portal,
    WebhookAuth,
    redact_url,
)
from exporter.directory import UserDirectory
from exporter.doctorload import MethodLoad, RequestLoad, request_load
from exporter.doctorreport import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    PortalReport,
    Report,
    format_json,
    format_text,
    nice_interval,
    seconds_text,
)
from exporter.failures import BitrixError, FetchError, NoAccess, PayloadError
from exporter.mapping import Profile, parse_profile, parse_users
from exporter.oauth import TokenState, read_state
from exporter.oncelog import OnceLog
from exporter.sources import Source, sources_for

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "Check",
    "PortalReport",
    "Report",
    "diagnose",
    "format_json",
    "format_text",
    "nice_interval",
]

USER_METHOD: Final = "user.get"
DEPARTMENT_METHOD: Final = "department.get"
# Reading a chat's members tells, without posting, whether the credential may write there.
CHAT_MEMBERS_METHOD: Final = "im.dialog.users.list"
# user_brief first: the lightest scope that still lists employees, so the one a fix names.
USER_SCOPES: Final = ("user_brief", "user", "user_basic")
# How many portals are checked at once; each stays within its own rate limit anyway.
PARALLEL_PORTALS: Final = 4
# One retry per request: enough to ride out one 503, few enough to stay "a handful".
RETRY: Final = RetryPolicy(max_retries=1)

_WEBHOOK_HOWTO: Final = (
    "create an inbound webhook in Bitrix24 (Developer resources -> Other -> Inbound webhook)"
)


def target_of(portal: Portal) -> str:
    if isinstance(portal.auth, WebhookAuth):
        return portal.auth.redacted
    return f"OAuth application {portal.auth.client_id} at {redact_url(portal.auth.client_endpoint)}"


# --------------------------------------------------------------------------- running


async def diagnose(
    config: Config, session: aiohttp.ClientSession, *, parallel: int = PARALLEL_PORTALS
) -> Report:
    """Check every portal of `config` (a few at a time); the report keeps the config's order."""
    gate = asyncio.Semaphore(parallel)

    async def one(portal: Portal) -> PortalReport:
        async with gate:
            return await PortalDoctor(portal, config, session).run()

    reports = await asyncio.gather(*(one(p) for p in config.portals))
    return Report(config.source, tuple(reports))


def _error_text(error: BitrixError) -> str:
    """A failed call in a report line: method, code, description and HTTP status.

    The only place that reads `BitrixError`'s fields, so that a change of the client's
    failure type touches one function here.
    """
    where = f"HTTP {error.status}" if error.status is not None else "no response"
    text = f": {error.description}" if error.description else ""
    return f"{error.method}: {error.error}{text} ({where})"


class PortalDoctor:
    """Runs the checks of one portal in order; later checks use what earlier ones learned."""

    def __init__(self, portal: Portal, config: Config, session: aiohttp.ClientSession) -> None:
        self.portal = portal
        self.config = config
        self.session = session
        self.stats = ClientStats()
        rate = portal.rate_limit
        self.throttle = PortalThrottle(rate.requests_per_second, rate.burst, self.stats)
        self.budget = OperatingBudget(portal.operating_limit)
        self.client = self._client(portal.auth)
        self.checks: list[Check] = []
        self.profile: Profile | None = None
        self.granted: frozenset[str] | None = None  # None: unknown
        self.sources: tuple[Source, ...] = sources_for(portal)
        self.users: list[int] | None = None  # None: unknown
        self.user_pages = 0

    def _client(self, auth: WebhookAuth | OAuthAuth) -> BitrixClient:
        return BitrixClient(
            self.portal.name,
            credential_for(auth, self.portal.name),
            self.session,
            throttle=self.throttle,
            # Another webhook has a budget of its own with the portal.
            budget=self.budget
            if auth == self.portal.auth
            else OperatingBudget(self.portal.operating_limit),
            stats=self.stats,
            timeout=self.config.request_timeout,
            retry=RETRY,
        )

    def add(self, name: str, status: str, summary: str, fix: str = "") -> bool:
        self.checks.append(Check(name, status, summary, fix))
        return status != FAIL

    async def run(self) -> PortalReport:
        if await self.reachable() and await self.credential():
            self.owner()
            await self.scopes()
            await self.im_webhooks()
            await self.selected_users()
            await self.departments()
            await self.load()
            await self.alert_receivers()
        else:
            self.add("other checks", SKIP, "they need a reachable portal and a working credential")
        return PortalReport(self.portal.name, target_of(self.portal), tuple(self.checks))

    # -- 1. reachable ------------------------------------------------------------------

    async def reachable(self) -> bool:
        auth = self.portal.auth
        bases = [auth.url if isinstance(auth, WebhookAuth) else auth.client_endpoint]
        if isinstance(auth, OAuthAuth):
            bases.append(auth.server)
        found: list[str] = []
        for base in bases:
            problem, seen = await self._probe(base)
            if problem is not None:
                summary, fix = problem
                return self.add("reachable", FAIL, summary, fix)
            found.append(seen)
        return self.add("reachable", OK, "; ".join(found))

    async def _probe(self, base: str) -> tuple[tuple[str, str] | None, str]:
        """Resolve, connect and ask for `/` of `base`'s host: ((summary, fix) or None, seen)."""
        parts = urlsplit(base)
        host = parts.hostname or ""
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        scheme = "HTTPS" if secure else "HTTP"
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            return (
                f"{host}: the name does not resolve ({exc.strerror})",
                "check the host name in the config (the portal's address, such as"
                " acme.bitrix24.com) and this machine's DNS",
            ), ""
        addresses = len({info[4][0] for info in infos})
        shown_port = "" if parts.port is None else f":{port}"
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout)
        try:
            async with self.session.get(
                f"{parts.scheme}://{parts.netloc}/", allow_redirects=False, timeout=timeout
            ) as response:
                status = response.status
        except aiohttp.ClientConnectorCertificateError as exc:
            cause = exc.certificate_error
            reason = (
                cause.verify_message if isinstance(cause, ssl.SSLCertVerificationError) else cause
            )
            return (
                f"{host}{shown_port}: the TLS certificate is not trusted ({reason})",
                "a proxy or firewall that intercepts TLS needs its CA certificate in this"
                " machine's trust store (SSL_CERT_FILE); a self-hosted portal needs a valid"
                " certificate",
            ), ""
        except aiohttp.ClientSSLError as exc:
            return (
                f"{host}{shown_port}: the TLS handshake failed ({exc})",
                "check that the URL's scheme and port match the server (https:// on 443)",
            ), ""
        except aiohttp.ClientConnectorError as exc:
            errno = exc.os_error.errno
            reason = os.strerror(errno) if errno else str(exc.os_error)
            return (
                f"cannot connect to {host} port {port}: {reason}",
                f"check the port in the URL, and that this machine may open {scheme}"
                " connections to the portal (firewall, proxy)",
            ), ""
        except TimeoutError:
            return (
                f"{host}{shown_port}: no answer within request_timeout"
                f" {seconds_text(self.config.request_timeout)}",
                "check the firewall and proxy between this machine and the portal",
            ), ""
        except aiohttp.ClientError as exc:
            return (
                f"{host}{shown_port}: {type(exc).__name__}: {exc}",
                "check the URL and the network between this machine and the portal",
            ), ""
        plural = "es" if addresses != 1 else ""
        return None, f"{host} resolves ({addresses} address{plural}), {scheme} answers ({status})"

    # -- 2. credential -----------------------------------------------------------------

    async def credential(self) -> bool:
        auth = self.portal.auth
        before: TokenState | None = None
        if isinstance(auth, OAuthAuth):
            problem = unwritable(auth.state_file)
            if problem is not None:
                return self.add(
                    "credential",
                    FAIL,
                    f"state file {auth.state_file} cannot be written: {problem}",
                    "the exporter rewrites it on every token refresh: make its directory"
                    " writable by the exporter's user (under systemd, StateDirectory= gives"
                    " /var/lib/bitrix24-exporter)",
                )
            try:
                before = read_state(auth.state_file)
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                return self.add(
                    "credential",
                    FAIL,
                    f"state file {auth.state_file} cannot be read: {reason}",
                    "make it readable by the exporter's user, or delete it and set"
                    " oauth.refresh_token to a fresh refresh token (docs/oauth.md)",
                )
        try:
            result = await self.client.call("profile")
            self.profile = parse_profile(result.result)
        except BitrixError as exc:
            return self.add("credential", FAIL, _error_text(exc), self._credential_fix(exc))
        except NoAccess:
            return self.add(
                "credential",
                FAIL,
                "profile: [] (the credential's user is deactivated)",
                "a dismissed user's webhook stops working: " + _WEBHOOK_HOWTO + " as an active"
                " administrator",
            )
        except PayloadError as exc:
            return self.add(
                "credential",
                FAIL,
                f"profile: unusable answer: {exc}",
                "the URL does not lead to Bitrix24's REST API: it must look like"
                " https://PORTAL/rest/USER_ID/SECRET/",
            )
        if isinstance(auth, WebhookAuth):
            return self.add("credential", OK, "webhook accepted")
        return self.add("credential", OK, self._oauth_summary(auth, before))

    def _oauth_summary(self, auth: OAuthAuth, before: TokenState | None) -> str:
        try:
            after = read_state(auth.state_file)
        except (OSError, ValueError):
            after = None
        if after is not None and (before is None or after.refresh_token != before.refresh_token):
            return f"the token refresh works; the new pair is in {auth.state_file}"
        left = 0.0 if after is None else max(0.0, after.expires - time.time())
        # Refreshing anyway would rotate the refresh token that a running exporter holds.
        return (
            f"the access token in {auth.state_file} is accepted (valid {left / 60:.0f} more"
            " minutes, so no refresh was made); the state file is writable"
        )

    def _credential_fix(self, error: BitrixError) -> str:
        auth = self.portal.auth
        code = error.error
        fixes = {
            "INVALID_CREDENTIALS": "the webhook was deleted, its URL is mistyped or its user was"
            " dismissed: " + _WEBHOOK_HOWTO + " and put its URL in the config",
            "NO_AUTH_FOUND": "the URL holds no valid credential: " + _WEBHOOK_HOWTO,
            "ACCESS_DENIED": "the portal's plan does not include the REST API (commercial"
            " plans only)",
            "INVALID_REQUEST": "Bitrix24 requires HTTPS: use the https:// URL",
            "OVERLOAD_LIMIT": "Bitrix24 support has blocked this portal's REST API: ask them to"
            " lift the block",
            "PORTAL_DELETED": "the portal no longer exists: check the host name",
            "invalid_grant": "authorise the application again and write the new refresh token"
            " to oauth.refresh_token after deleting the state file (docs/oauth.md)",
            "invalid_client": "check oauth.client_id and oauth.client_secret against the"
            " application's card in Bitrix24",
            "state_file": "make the state file readable and writable by the exporter's user",
            "no_refresh_token": "authorise the application and set oauth.refresh_token"
            " (docs/oauth.md)",
            "invalid_response": "the URL does not lead to Bitrix24's REST API: it must look"
            " like https://PORTAL/rest/USER_ID/SECRET/",
        }
        fix = fixes.get(code, "see the error: docs/bitrix24.md lists what each code means")
        if isinstance(auth, OAuthAuth) and code in ("connection", "timeout", "invalid_client"):
            hint = oauth_server_hint(auth)
            if hint:
                fix += "; " + hint
        return fix

    # -- 3. owner ----------------------------------------------------------------------

    def owner(self) -> None:
        profile = self.profile
        assert profile is not None
        who = f"user {profile.user_id} ({profile.name or 'no name'})"
        tasks = self.portal.tasks
        if profile.admin:
            self.add("owner", OK, f"{who}, administrator: may read every user's task counters")
            return
        reads = "not an administrator: reads only its own task counters"
        if not tasks.enabled or tasks.users == "self":
            self.add("owner", OK, f"{who}, {reads}, which is what tasks.users: self asks")
        elif tasks.users == "all":
            self.add(
                "owner",
                FAIL,
                f"{who} is not an administrator: Bitrix24 answers [] for the task counters of"
                " users it does not head, so tasks.users: all would export next to nothing",
                "use a webhook created by a portal administrator, or set tasks.users: self",
            )
        elif isinstance(tasks.users, DepartmentUsers):
            self.add(
                "owner",
                WARN,
                f"{who}, {reads} and those of users in departments it heads",
                f"unless user {profile.user_id} heads every department listed in tasks.users,"
                " use a webhook created by a portal administrator",
            )
        else:
            others = [u for u in tasks.users if u != profile.user_id]
            status = WARN if others else OK
            self.add(
                "owner",
                status,
                f"{who}, {reads} and those of users in departments it heads"
                + (f" ({len(others)} other users are listed)" if others else ""),
                "use a webhook created by a portal administrator" if others else "",
            )

    # -- 4. scopes ---------------------------------------------------------------------

    def needed_scopes(self) -> list[tuple[tuple[str, ...], str]]:
        """(acceptable scopes, what needs them) for the features this portal's config uses,
        each set of scopes once."""
        tasks, teams = self.portal.tasks, self.portal.teams
        needed = [(source.scopes, source.method) for source in self.sources]
        if teams.enabled:
            needed.append((("department",), DEPARTMENT_METHOD))
        if (tasks.enabled and tasks.users != "self") or teams.enabled:
            needed.append((USER_SCOPES, USER_METHOD))
        needed += receiver_scopes(self.config, self.portal)
        once: dict[tuple[str, ...], str] = {}
        for scopes, why in needed:
            once.setdefault(scopes, why)
        return list(once.items())

    async def scopes(self) -> None:
        needed = self.needed_scopes()
        wanted = ", ".join(" or ".join(s) for s, _ in needed) or "none"
        try:
            result = (await self.client.call("scope")).result
        except BitrixError as exc:
            self.add(
                "scopes",
                WARN,
                f"cannot list the granted scopes: {_error_text(exc)}; needed: {wanted}",
                "the first poll cycle will name a missing scope in its error",
            )
            return
        listed = result if isinstance(result, list) else []
        granted = frozenset(s for s in listed if isinstance(s, str))
        self.granted = granted
        missing = [(s, why) for s, why in needed if granted.isdisjoint(s)]
        shown = ", ".join(sorted(granted)) or "none"
        if not missing:
            self.add("scopes", OK, f"granted: {shown}; needed: {wanted}")
            return
        names = ", ".join(f"{' or '.join(s)} (for {why})" for s, why in missing)
        ticks = ", ".join(s[0] for s, _ in missing)
        where = (
            "edit the webhook in Bitrix24 (Developer resources -> Integrations) and tick "
            + ticks
            + "; its URL stays the same"
            if isinstance(self.portal.auth, WebhookAuth)
            else "add " + ticks + " to the application's scopes in Bitrix24 and authorise it"
            " again (docs/oauth.md)"
        )
        self.add("scopes", FAIL, f"granted: {shown}; missing: {names}", where)

    async def im_webhooks(self) -> None:
        """Each extra im webhook: its user, and that it may read chat counters."""
        for auth in self.portal.im.webhooks:
            client = self._client(auth)
            try:
                profile = parse_profile((await client.call("profile")).result)
                granted = (await client.call("scope")).result
            except BitrixError as exc:
                self.add(
                    "im webhook",
                    FAIL,
                    f"{auth.redacted}: {_error_text(exc)}",
                    self._credential_fix(exc),
                )
                continue
            except FetchError as exc:
                self.add("im webhook", FAIL, f"{auth.redacted}: profile: {exc}", _WEBHOOK_HOWTO)
                continue
            who = f"user {profile.user_id} ({profile.name or 'no name'})"
            if isinstance(granted, list) and "im" not in granted:
                self.add(
                    "im webhook",
                    FAIL,
                    f"{auth.redacted}: {who}; scope im is missing",
                    "edit that webhook in Bitrix24 and tick im",
                )
            else:
                self.add("im webhook", OK, f"{auth.redacted}: {who}, reads its own chat counters")

    # -- 5. users ----------------------------------------------------------------------

    async def selected_users(self) -> None:
        tasks = self.portal.tasks
        profile = self.profile
        assert profile is not None
        if not tasks.enabled:
            self.users = []
            self.add("users", OK, "tasks are disabled: no user list is needed")
            return
        if tasks.users == "self":
            self.users = [profile.user_id]
            self.add("users", OK, f"tasks.users: self selects 1 user (user {profile.user_id})")
            return
        if isinstance(tasks.users, DepartmentUsers):
            shown = ", ".join(str(d) for d in tasks.users.departments)
            self.add(
                "users",
                SKIP,
                f"tasks.users: {{departments: [{shown}]}}: doctor does not count these yet;"
                " the first poll cycle logs how many users it found",
            )
            return
        if self.granted is not None and self.granted.isdisjoint(USER_SCOPES):
            self.add("users", SKIP, "listing users needs a user scope (see scopes)")
            return
        if isinstance(tasks.users, tuple):
            await self._listed_users(list(tasks.users))
        else:
            await self._all_users()

    async def _all_users(self) -> None:
        excluded = self.portal.tasks.exclude_users
        directory = UserDirectory(self.portal.name)
        try:
            await directory.discover(self.client, OnceLog(logging.getLogger(__name__)))
        except BitrixError as exc:
            self.add("users", FAIL, _error_text(exc), "see the error")
            return
        except FetchError as exc:
            self.add("users", FAIL, f"user.get: unusable answer: {exc}", "see the error")
            return
        everyone = directory.discovered or []
        self.user_pages = max(1, math.ceil(len(everyone) / MAX_BATCH))
        self.users = [u for u in everyone if u not in excluded]
        left_out = len(everyone) - len(self.users)
        summary = f"tasks.users: all selects {len(self.users)} active employees"
        if left_out:
            summary += f" ({left_out} more excluded by exclude_users)"
        if not self.users:
            self.add("users", WARN, summary, "check exclude_users: nothing would be polled")
        else:
            self.add("users", OK, summary)

    async def _listed_users(self, listed: list[int]) -> None:
        commands = [Command(f"user_{i}", USER_METHOD, {"ID": i}) for i in listed]
        outcome = await self.client.batch(commands)
        found: set[int] = set()
        for command in commands:
            result = outcome.get(command.key)
            if isinstance(result, BitrixError):
                self.add("users", FAIL, _error_text(result), "see the error")
                return
            if isinstance(result, list):
                active = [r for r in result if isinstance(r, dict) and r.get("ACTIVE") is True]
                found.update(u.user_id for u in parse_users(active))
        self.user_pages = math.ceil(len(commands) / MAX_BATCH)
        excluded = self.portal.tasks.exclude_users
        self.users = [u for u in listed if u not in excluded]
        missing = [u for u in listed if u not in found]
        summary = f"tasks.users lists {len(listed)} users"
        if missing:
            shown = ", ".join(str(u) for u in missing)
            self.add(
                "users",
                WARN,
                f"{summary}; not found or inactive: {shown}",
                "remove them from tasks.users: their counters would stay empty",
            )
        else:
            self.add("users", OK, f"{summary}, all active")

    async def departments(self) -> None:
        """With teams: how many departments the portal has (all of them are exported)."""
        if not self.portal.teams.enabled:
            return
        if self.granted is not None and "department" not in self.granted:
            self.add("departments", SKIP, "listing departments needs scope department (see scopes)")
            return
        try:
            first = await self.client.call(DEPARTMENT_METHOD, {"START": 0})
        except BitrixError as exc:
            self.add("departments", FAIL, _error_text(exc), self._call_fix(DEPARTMENT_METHOD, ""))
            return
        listed = first.result if isinstance(first.result, list) else []
        total = first.total if first.total is not None else len(listed)
        self.add("departments", OK, f"teams: {total} active departments")

    # -- 6 and 7. load -----------------------------------------------------------------

    async def load(self) -> None:
        if self.users is None:
            self.add("rate limit", SKIP, "the number of users is unknown (see users)")
            return
        rate = self.portal.rate_limit
        assert self.profile is not None
        requests = request_load(
            self.sources,
            self.users,
            self.profile.user_id,
            callers=len(self.portal.im.webhooks),
            requests_per_second=rate.requests_per_second,
            burst=rate.burst,
        )
        methods = await self._method_loads(requests)
        usable = self.portal.operating_limit * (1 - OperatingBudget.HEADROOM)
        # One suggestion that fits everything: the sustained rate and every polled method.
        shortest = max(
            [requests.sustained]
            + [m.shortest_period(usable) for m in methods if m.method != USER_METHOD]
        )
        suggestion = (
            f"set poll_interval: {nice_interval(shortest)} or longer, or poll fewer users,"
            " groups or roles"
        )
        self._rate_line(requests, suggestion)
        for method in methods:
            self._operating_line(method, usable, suggestion)

    async def _method_loads(self, requests: RequestLoad) -> list[MethodLoad]:
        """Call each polled method once, for real, and read its cost from the answer."""
        assert self.profile is not None and self.users is not None
        own = self.profile.user_id
        cycle = max(self.config.poll_interval, requests.sustained)
        loads: list[MethodLoad] = []
        for source in self.sources:
            count = len(source.plan([own] if source.caller_only else self.users))
            sample = source.plan([own])
            if not count or not sample:
                continue
            method = source.method
            if self.granted is not None and self.granted.isdisjoint(source.scopes):
                skipped = f"not called: scope {' or '.join(source.scopes)} is missing (see scopes)"
                loads.append(MethodLoad(method, count, cycle, None, None, skipped=skipped))
                continue
            failure = ""
            # The credential's own user: whoever it is, it may read that. Two calls in one
            # batch: they run one after the other, and the growth of the portal's running
            # total between them is what a call costs (a total alone also holds what was
            # spent before, by anyone).
            params = sample[0].command.params
            twice = [Command(f"cost{i}", method, params) for i in (1, 2)]
            outcome = await self.client.batch(twice)
            errors = [r for r in outcome.values() if isinstance(r, BitrixError)]
            if errors:
                failure = _error_text(errors[0])
            cost, operating = self.budget.cost_bound(method), self.budget.operating(method)
            loads.append(MethodLoad(method, count, cycle, cost, operating, failure))
        if self.user_pages:
            # Discovery runs on its own schedule, at most once per cycle.
            period = max(self.config.user_refresh_interval, cycle)
            cost = self.budget.cost_bound(USER_METHOD)
            operating = self.budget.operating(USER_METHOD)
            loads.append(MethodLoad(USER_METHOD, self.user_pages, period, cost, operating))
        return loads

    def _rate_line(self, load: RequestLoad, suggestion: str) -> None:
        rate = self.portal.rate_limit
        interval = self.config.poll_interval
        extra = load.requests - math.ceil(load.commands / MAX_BATCH)
        webhooks = f", + {extra} for im webhooks" if extra else ""
        summary = (
            f"{load.requests} request{'s' if load.requests != 1 else ''} per cycle"
            f" ({load.commands} commands in batches of"
            f" {MAX_BATCH}{webhooks}); shortest cycle {seconds_text(load.idle)} from an idle"
            f" bucket (burst {rate.burst}), {seconds_text(load.sustained)} sustained at"
            f" {rate.requests_per_second:g} requests/s"
        )
        fix = suggestion + (
            "; on an Enterprise plan, rate_limit: enterprise allows 5 requests/s"
            if rate.requests_per_second < 5
            else ""
        )
        shown = seconds_text(interval)
        throttled = sum(n for (_, code), n in self.stats.requests.items() if code == "503")
        if interval < load.idle:
            self.add(
                "rate limit",
                FAIL,
                f"{summary}; poll_interval {shown} is shorter than even an idle bucket allows",
                fix,
            )
        elif interval < load.sustained:
            self.add(
                "rate limit",
                FAIL,
                f"{summary}; poll_interval {shown} is shorter than the sustained minimum:"
                " every cycle would start later than the one before",
                fix,
            )
        elif throttled:
            self.add(
                "rate limit",
                WARN,
                f"{summary}; poll_interval {shown} fits, but the portal answered 503"
                f" QUERY_LIMIT_EXCEEDED {throttled} times to doctor's few requests",
                "another client drains the same bucket (Bitrix24 counts per portal and"
                " address): find it, or leave room with a longer poll_interval",
            )
        else:
            self.add("rate limit", OK, f"{summary}; poll_interval {shown} fits")

    def _operating_line(self, load: MethodLoad, usable: float, suggestion: str) -> None:
        method, limit = load.method, self.portal.operating_limit
        if load.skipped:
            self.add("operating", SKIP, f"{method}: {load.skipped}")
            return
        if load.failure:
            self.add("operating", FAIL, load.failure, self._call_fix(method, load.failure))
            return
        if load.cost is None:
            self.add("operating", WARN, f"{method}: the answer had no time block", "")
            return
        per_window = load.per_window
        summary = (
            f"{method}: {seconds_text(load.cost)} per call x {load.calls} every"
            f" {seconds_text(load.period)} = {seconds_text(per_window)} per 10 minutes"
        )
        if load.operating is None:
            self.add(
                "operating",
                OK,
                f"{summary}; the portal reports no operating time (its load limiter is off)",
            )
            return
        of_limit = f"of operating_limit {seconds_text(limit)}"
        if per_window > usable:
            self.add(
                "operating",
                FAIL,
                f"{summary}, more than the {seconds_text(usable)} {of_limit} leaves",
                suggestion + ": past the limit Bitrix24 blocks the method for the rest of its"
                " 10 minutes (429 OPERATION_TIME_LIMIT)",
            )
        elif load.operating - load.cost + per_window > usable:
            self.add(
                "operating",
                WARN,
                f"{summary} {of_limit}, but {seconds_text(load.operating)} of it is already"
                " used in this window",
                "something else spends this credential's budget (a running exporter with the"
                " same credential counts too): give the exporter a webhook of its own",
            )
        else:
            share = 100 * per_window / limit
            self.add("operating", OK, f"{summary} {of_limit} ({share:.0f} %)")

    def _call_fix(self, method: str, failure: str) -> str:
        if "insufficient_scope" in failure:
            return "the credential lacks the method's scope (see scopes)"
        if method == "tasks.task.counters.get" and "Group not found" in failure:
            return (
                f"tasks.groups lists group {self.portal.tasks.groups[0]}, whose tasks the"
                " credential's user may not see: remove it or use an administrator's webhook"
            )
        return "see the error: docs/bitrix24.md lists what each code means"

    # -- 8. alert receivers ------------------------------------------------------------

    async def alert_receivers(self) -> None:
        """Each alert receiver that sends through this portal: its targets, checked by
        reading only (a chat's members, a user's record); nothing is posted."""
        for receiver in self.config.alert_receivers:
            if receiver.portal == self.portal.name:
                self._receiver_line(receiver, await self._receiver_problems(receiver))

    async def _receiver_problems(self, receiver: AlertReceiver) -> list[tuple[str, str, str, str]]:
        """(status, target, what was found, fix) per target of `receiver`."""
        assert self.profile is not None
        me = self.profile.user_id
        found: list[tuple[str, str, str, str]] = []
        chat = receiver.chat
        if chat is not None and chat.isdigit():
            try:
                result = (await self.client.call(USER_METHOD, {"ID": int(chat)})).result
            except BitrixError as exc:
                found.append((FAIL, chat, _error_text(exc), "see the error"))
            else:
                active = [r for r in result if isinstance(r, dict) and r.get("ACTIVE") is True]
                users = parse_users(active) if isinstance(result, list) else []
                if users:
                    name = users[0].name or "no name"
                    found.append((OK, chat, f"a private dialog with user {chat} ({name})", ""))
                else:
                    found.append(
                        (
                            FAIL,
                            chat,
                            f"no active user {chat}",
                            "set chat to an active user's id, or to a chat like chat42",
                        )
                    )
        elif chat is not None:
            try:
                members = (await self.client.call(CHAT_MEMBERS_METHOD, {"DIALOG_ID": chat})).result
            except BitrixError as exc:
                status = WARN if exc.error == "ERROR_METHOD_NOT_FOUND" else FAIL
                fix = (
                    "the portal cannot list chat members: check by hand that user"
                    f" {me} is a member of {chat}"
                    if status == WARN
                    else f"check the chat id (a chat's address in Bitrix24 ends in {chat[:4]}..."
                    f") and that user {me}, whose credential sends, is a member of it"
                )
                found.append((status, chat, _error_text(exc), fix))
            else:
                ids = {
                    str(m.get("id"))
                    for m in (members if isinstance(members, list) else [])
                    if isinstance(m, dict)
                }
                if str(me) in ids:
                    found.append((OK, chat, f"user {me} is a member, so it may write there", ""))
                else:
                    found.append(
                        (
                            FAIL,
                            chat,
                            f"user {me}, whose credential sends, is not a member",
                            f"add user {me} to {chat} in Bitrix24, or choose a chat it is in",
                        )
                    )
        if receiver.notify_user:
            found.append((OK, "notify_user", "personal notifications (scope im)", ""))
        if receiver.notify_head:
            if self.portal.teams.enabled:
                found.append((OK, "notify_head", "the department's head (teams)", ""))
            else:
                found.append(
                    (
                        WARN,
                        "notify_head",
                        "department heads are known only with teams",
                        f"set teams.enabled: true for portal {self.portal.name}",
                    )
                )
        return found

    def _receiver_line(
        self, receiver: AlertReceiver, found: list[tuple[str, str, str, str]]
    ) -> None:
        order = (FAIL, WARN, OK)
        status = next((s for s in order if any(f[0] == s for f in found)), OK)
        summary = f"{receiver.name}: " + "; ".join(f"{t}: {what}" for _, t, what, _ in found)
        fixes = "; ".join(fix for st, _, _, fix in found if fix and st != OK)
        self.add("alert receiver", status, summary, fixes)


# --------------------------------------------------------------------------- helpers


def receiver_scopes(config: Config, portal: Portal) -> list[tuple[tuple[str, ...], str]]:
    """The scope alert receivers sending through `portal` need: im, for messages and
    notifications alike."""
    if any(r.portal == portal.name for r in config.alert_receivers):
        return [(("im",), "alert receivers")]
    return []


def unwritable(path: str) -> str | None:
    """Why the OAuth state file could not be replaced, or None if it can.

    The exporter writes a temporary file next to it and renames it over the old one, so the
    test is creating (and removing) such a file; a directory that does not exist yet must
    be creatable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    probe = directory
    while not os.path.isdir(probe):
        parent = os.path.dirname(probe)
        if os.path.exists(probe) or parent == probe:
            return f"{probe} is not a directory"
        probe = parent
    if probe != directory:
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"{directory} does not exist and {probe} is not writable"
        return None
    try:
        fd, name = tempfile.mkstemp(prefix=".doctor.", suffix=".tmp", dir=directory)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(name)
    return None


_RU_ZONES: Final = (".ru", ".by", ".kz")


def oauth_server_hint(auth: OAuthAuth) -> str:
    """What to say when the OAuth server does not match the portal's region, else ""."""
    host = urlsplit(auth.client_endpoint).hostname or ""
    server = urlsplit(auth.server).hostname or ""
    russian = host.endswith(_RU_ZONES)
    if russian and server == "oauth.bitrix.info":
        return "portals in the .ru zone authorise at https://oauth.bitrix24.tech/: set oauth.server"
    if not russian and server == "oauth.bitrix24.tech":
        return "oauth.bitrix24.tech serves .ru portals; others use https://oauth.bitrix.info/"
    return ""
