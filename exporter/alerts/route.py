"""`POST /alerts/{name}`: Alertmanager's webhook, answered so Alertmanager does the right thing.

Alertmanager retries a webhook that answers 5xx and drops one that answers 4xx
(`notify/webhook/webhook.go`: only 5xx is recoverable, no extra retry codes), so:

- 404: no receiver of that name; 401: the bearer token is missing or wrong;
- 400: the body is larger than `MAX_BODY`, not JSON, or not a version 4 payload;
- 200: every target got it now or had it already;
- 503 with `Retry-After`: Bitrix24 could not be reached, the method's operating budget is
  spent, or the receiver's per-minute cap is reached (4xx would lose the notification);
- 422: Bitrix24 refused a target for good (no access to the chat, unknown user, missing
  scope): retrying would not help, the log and `bitrix24_alert_deliveries_total` say why.

Every answer is one line of text. The token is compared in constant time (as digests, so
its length is not told either). When basic auth from the web config protects the server,
Alertmanager authenticates with it (a request carries one `Authorization` header) and the
bearer check is skipped. The route is only added when a receiver is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping, Sequence

from aiohttp import hdrs, web

from exporter.alerts.delivery import AlertStats, Receiver, ReceiverSettings
from exporter.alerts.payload import PayloadRejected, parse_notification

log = logging.getLogger(__name__)

PATH = "/alerts/{name}"
# A notification of 100 alerts with long annotations is ~200 KB; max_alerts in
# Alertmanager's webhook_configs keeps bigger groups below this (docs/alerts.md).
MAX_BODY = 1 << 20
REALM = "bitrix24-exporter alerts"


Rebuild = Callable[[Sequence[ReceiverSettings], Mapping[str, Receiver]], dict[str, Receiver]]


class AlertRoutes:
    """The receivers the route serves; replaced as a whole on reload."""

    def __init__(
        self,
        receivers: Mapping[str, Receiver],
        stats: AlertStats,
        *,
        basic_auth: Callable[[], bool] = lambda: False,
        delivered: Callable[[], None] = lambda: None,
        rebuild: Rebuild | None = None,
    ) -> None:
        self.receivers = dict(receivers)
        self.stats = stats
        self.installed = False
        self._basic_auth = basic_auth
        self._delivered = delivered
        self._rebuild = rebuild

    def apply(self, settings: Sequence[ReceiverSettings]) -> None:
        """Serve the receivers of a reloaded config."""
        if self._rebuild is None:
            return
        receivers = self._rebuild(settings, self.receivers)
        if receivers and not self.installed:
            log.warning(
                "alert receivers %s need a restart: POST /alerts/{name} is only added at start"
                " when a receiver is configured",
                ", ".join(sorted(receivers)),
            )
        self.receivers = receivers

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        receiver = self.receivers.get(name)
        if receiver is None:
            return _answer(404, f"no alert receiver named {_printable(name)!r}")
        header = request.headers.get(hdrs.AUTHORIZATION)
        basic_auth = self._basic_auth()
        if receiver.token is None and not basic_auth:
            # The config check refuses this at start and on reload; basic auth may still
            # have been taken out of the web config since.
            log.error("alert receiver %s: neither a token nor basic auth protects it", name)
            return _answer(401, f"alert receiver {name}: not protected by a token or basic auth")
        if receiver.token is not None and not basic_auth and not authorized(header, receiver.token):
            return _answer(
                401,
                f"alert receiver {name}: missing or wrong bearer token",
                {hdrs.WWW_AUTHENTICATE: f'Bearer realm="{REALM}"'},
            )
        try:
            body = await read_bounded(request, MAX_BODY)
            try:
                decoded = json.loads(body)
            except (ValueError, RecursionError):
                raise PayloadRejected("body: not JSON") from None
            notification = parse_notification(decoded)
        except PayloadRejected as rejected:
            log.warning("alert receiver %s: refused a notification: %s", name, rejected)
            return _answer(400, f"alert receiver {name}: {rejected}")
        report = await receiver.deliver(notification)
        self._delivered()
        line = f"alert receiver {name}: {report.summary()}"
        if report.retry_after is not None:
            log.warning("%s", line)
            return _answer(503, line, {hdrs.RETRY_AFTER: str(report.retry_after)})
        if report.failed:
            log.error("%s", line)
            return _answer(422, line)
        log.info("%s", line)
        return _answer(200, line)


def authorized(header: str | None, token: str) -> bool:
    """Whether `header` is `Bearer <token>`, compared in constant time.

    >>> authorized("Bearer s3cret", "s3cret"), authorized("bearer  s3cret ", "s3cret")
    (True, True)
    >>> authorized("Bearer wrong", "s3cret"), authorized("Basic czNjcmV0", "s3cret")
    (False, False)
    """
    if header is None:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Digests of equal length: compare_digest would return early on a length mismatch.
    expected = hashlib.sha256(token.encode()).digest()
    provided = hashlib.sha256(given.strip().encode("utf-8", "replace")).digest()
    return hmac.compare_digest(provided, expected)


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The body, refused (PayloadRejected) as soon as it is known to exceed `limit` bytes."""
    too_large = PayloadRejected(f"body: larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def install(app: web.Application, routes: AlertRoutes) -> None:
    """Add the route, when there is any receiver to serve."""
    if routes.receivers:
        app.router.add_post(PATH, routes.handle)
        routes.installed = True


def _answer(status: int, text: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers)


def _printable(name: str) -> str:
    return name if len(name) <= 60 else name[:57] + "..."
