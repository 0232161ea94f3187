"""Whether the configured load fits the portal's limits: the warnings, as pure functions.

A load that does not fit is not an error (the exporter stretches its cycles and reports
`bitrix24_poll_behind_seconds`), but the admin should hear it once, with the numbers.
"""

from __future__ import annotations

import math

from exporter.bitrix import MAX_BATCH, OPERATING_WINDOW


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


def budget_warning(
    portal: str, method: str, cost: float, calls: int, interval: float, limit: float
) -> str | None:
    """The warning when one cycle's calls of `method` spend more than its operating limit."""
    per_window = cost * calls * (OPERATING_WINDOW / interval)
    if per_window <= limit:
        return None
    return (
        f"portal {portal}: {method} costs about {cost:.3f}s per call; {calls} calls every"
        f" {interval:.0f}s need {per_window:.0f}s of the {limit:.0f}s operating budget per"
        " 10 minutes: cycles will be stretched to fit"
    )
