"""What the poller says about fetches: each problem once, and once more when it ends.

A portal with thousands of commands a cycle must not write thousands of lines when
they all fail the same way: a refused command is said once per command until it works
again, a method blocked by OPERATION_TIME_LIMIT once per method, and a lost batch
request once for the portal (not once per command it carried).
"""

from __future__ import annotations

from collections.abc import Callable

from exporter.failures import BitrixError, FetchError
from exporter.oncelog import OnceLog
from exporter.sources import Planned


class FetchLog:
    """Log lines about one portal's fetches, through its once-log.

    `who` names a user in a line (`exporter.privacy.Privacy.who`); where it names nobody,
    a failure is said once per method, query and error for all users alike.
    """

    def __init__(
        self, portal: str, once: OnceLog, who: Callable[[int], str | None] | None = None
    ) -> None:
        self.portal = portal
        self.once = once
        self.who = who or (lambda user_id: f"user {user_id}")

    def failed(self, planned: Planned, failure: FetchError) -> None:
        command = planned.command
        if isinstance(failure, BitrixError) and failure.whole_batch:
            return  # the whole request failed: said once for the portal, by `requests`
        if failure.error == "OPERATION_TIME_LIMIT":
            # The portal blocked the method for the credential, not for this user.
            self.once.say(
                f"operating-{command.method}",
                f"portal {self.portal}: {command.method}: {failure.error}:"
                f" {failure.description} (held back until the portal's operating window"
                " resets)",
                signature=failure.error,
            )
            return
        what = planned.source.describe(command)
        who = self.who(planned.user_id)
        key = command.key if who else f"{command.method}-{what}-{failure.error}"
        self.once.say(
            key,
            f"portal {self.portal}: {command.method} for {who or 'one or more users'}"
            f" ({what}): {failure.error}: {failure.description}",
        )

    def succeeded(self, planned: Planned) -> None:
        key, method = planned.command.key, planned.command.method
        who = self.who(planned.user_id)
        if who:
            self.once.resolve(key, f"portal {self.portal}: {method} for {who} works again")
        self.once.resolve(f"operating-{method}", f"portal {self.portal}: {method} runs again")

    def requests(self, lost: list[BitrixError], commands: int) -> None:
        """How many of a cycle's batch requests failed as a whole (none: resolved)."""
        if not lost:
            self.once.resolve("requests", f"portal {self.portal}: batch requests succeed again")
            return
        self.once.say(
            "requests",
            f"{lost[0]} ({len(lost)} of {commands} commands lost; they keep their last values"
            " until stale_after)",
            signature=lost[0].error,
        )
