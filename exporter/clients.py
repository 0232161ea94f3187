"""The Bitrix24 clients of one portal and what they share.

Every credential of a portal (the main webhook or OAuth application, and each extra
per-user webhook) gets a `BitrixClient`; all of them share one `PortalThrottle`
(Bitrix24 counts requests per portal, whichever credential sends them) and one
`ClientStats`, and each has its own `OperatingBudget` (Bitrix24 counts operating time per
credential and method). After a config reload the next set keeps whatever still applies:
the bucket under the same rate limit, the budgets under the same operating limit and window, and
every credential with its tokens, so a reload causes no burst and no token refresh.
"""

from __future__ import annotations

import aiohttp

from exporter.bitrix import (
    BitrixClient,
    ClientStats,
    Credential,
    OperatingBudget,
    PortalThrottle,
    RetryPolicy,
    WebhookCredential,
)
from exporter.config import OAuthAuth, Portal, WebhookAuth
from exporter.oauth import OAuthCredential

Auth = WebhookAuth | OAuthAuth


def credential_for(auth: Auth, portal: str) -> Credential:
    if isinstance(auth, WebhookAuth):
        return WebhookCredential(url=auth.url, secret=auth.secret)
    return OAuthCredential(portal, auth)


class PortalClients:
    """The main client of a portal and one client per extra per-user webhook."""

    def __init__(
        self,
        portal: Portal,
        session: aiohttp.ClientSession,
        *,
        timeout: float,
        retry: RetryPolicy,
        previous: PortalClients | None = None,
    ) -> None:
        old = previous
        self.portal = portal
        self.stats: ClientStats = old.stats if old else ClientStats()
        rate = portal.rate_limit
        same_rate = old is not None and old.portal.rate_limit == rate
        self.throttle: PortalThrottle = (
            old.throttle
            if old and same_rate
            else PortalThrottle(rate.requests_per_second, rate.burst, self.stats)
        )
        budget_settings = (portal.operating_limit, portal.operating_window)
        same_limit = old is not None and (
            (old.portal.operating_limit, old.portal.operating_window) == budget_settings
        )
        old_budgets = old.budgets if old and same_limit else {}
        old_credentials = old.credentials if old else {}
        self.budgets: dict[Auth, OperatingBudget] = {}
        self.credentials: dict[Auth, Credential] = {}

        def client(auth: Auth) -> BitrixClient:
            budget = old_budgets.get(auth) or OperatingBudget(
                portal.operating_limit, window=portal.operating_window
            )
            credential = old_credentials.get(auth) or credential_for(auth, portal.name)
            self.budgets[auth] = budget
            self.credentials[auth] = credential
            return BitrixClient(
                portal.name,
                credential,
                session,
                throttle=self.throttle,
                budget=budget,
                stats=self.stats,
                timeout=timeout,
                retry=retry,
            )

        self.main = client(portal.auth)
        # Each reads only its own user's data (the caller_only sources).
        self.callers = {auth: client(auth) for auth in portal.im.webhooks}
