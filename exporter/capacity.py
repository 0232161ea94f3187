"""Whether the configured load fits the portal's limits, said once.

A load that does not fit is not an error (the exporter stretches its cycles and reports
`bitrix24_poll_behind_seconds`), but the admin should hear it once, with the numbers.
"""

from __future__ import annotations

import math
from collections import Counter

from exporter.bitrix import MAX_BATCH, OperatingBudget
from exporter.config import Config, Portal
from exporter.oncelog import OnceLog
from exporter.sources import Planned


def load_warning(
    portal: str, commands: int, extra_requests: int, requests_per_second: float, interval: float
) -> str | None:
    """The warning when one cycle's requests take longer than the poll interval.

    >>> print(load_warning("acme", 10000, 0, 2.0, 60.0))  # doctest: +NORMALIZE_WHITESPACE
    portal acme: one cycle needs 200 requests (10000 commands), 100s at 2 requests/s,
    longer than poll_interval 60s: cycles will run back to back
    >>> load_warning("acme", 50, 0, 2.0, 60.0) is None
    True
    """
    requests = math.ceil(commands / MAX_BATCH) + extra_requests
    seconds = requests / requests_per_second
    if seconds <= interval:
        return None
    return (
        f"portal {portal}: one cycle needs {requests} requests ({commands} commands),"
        f" {seconds:.3g}s at {requests_per_second:.3g} requests/s, longer than"
        f" poll_interval {interval:.3g}s: cycles will run back to back"
    )


class CapacityCheck:
    """Says, through a portal's once-log, when its configured load does not fit."""

    def __init__(self, portal: Portal, config: Config, once: OnceLog) -> None:
        self.portal = portal
        self.config = config
        self.once = once

    def check_load(self, commands: int, extra_requests: int) -> None:
        """Before a cycle's requests: do they fit the poll interval under the rate limit?"""
        rate = self.portal.rate_limit.requests_per_second
        interval = self.config.poll_interval
        warning = load_warning(self.portal.name, commands, extra_requests, rate, interval)
        if warning is None:
            self.once.resolve("load")
        else:
            self.once.say("load", warning)

    def expect_budget(self, plan: list[Planned], budget: OperatingBudget) -> None:
        """Before a cycle's calls: tell the budget what each method will be asked for; it
        says, once and as soon as the first answers tell what a call costs, when that
        does not fit the operating limit."""
        interval = self.config.poll_interval
        for method, calls in Counter(planned.command.method for planned in plan).items():

            def warn(text: str, method: str = method) -> None:
                self.once.say(f"budget-{method}", f"portal {self.portal.name}: {text}")

            budget.expect(method, calls=calls, every=interval, warn=warn)
